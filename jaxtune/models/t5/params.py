"""T5's HF <-> jaxtune key table: the module names are HF's (`encoder.block.0.layer.0.SelfAttention.q`),
so DEFAULT_RULES cover every parameter (kernels transposed to PyTorch's (out, in), `embedding` and the
RMS norms' `scale` -> `weight`)."""

KEY_RULES = ()

# Checkpoint keys that are not parameters here.
IGNORE_KEYS = (
    r"^(encoder|decoder)\.embed_tokens\.weight$",  # tied to `shared` (older checkpoints hold copies)
    r"^lm_head\.weight$",  # a tied head's copy of `shared` (an untied head is a parameter and is read)
    r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",  # unused, as in HF
)

# Parameters a checkpoint may lack: none (an encoder checkpoint cannot start a decoder).
NEW_OK = ()
