"""BART / Marian HF <-> jaxtune key table: the module names are HF's (`model.encoder.layers.0.self_attn.q_proj`,
`model.encoder.embed_positions`), so DEFAULT_RULES cover every parameter (kernels transposed to
PyTorch's (out, in); `embedding` and LayerNorm `scale` -> `weight`)."""

KEY_RULES = ()

# Checkpoint keys that are not parameters here.
IGNORE_KEYS = (
    r"(^|\.)(encoder|decoder)\.embed_tokens\.weight$",  # tied to `shared` (older checkpoints hold copies)
    r"^lm_head\.weight$",  # a tied head's copy of `shared` (an untied head is a parameter and is read)
    r"(^|\.)(encoder|decoder)\.embed_positions\.weight$",  # Marian's fixed sinusoids (BART's learned ones are read)
)

# Parameters a checkpoint may lack: `final_logits_bias` (transformers keeps it as a buffer that
# some checkpoints do not save; zeros, as transformers initialises it).
NEW_OK = (r"^final_logits_bias$",)
