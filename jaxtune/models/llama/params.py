"""The Llama family's HF <-> jaxtune key table: the module names are HF's, so DEFAULT_RULES cover
every parameter (linear kernels transposed to PyTorch's (out, in), `embedding` / RMSNorm `scale`
-> `weight`); nothing needs a rule of its own."""

KEY_RULES = ()

# Checkpoint keys that are not parameters here.
IGNORE_KEYS = (
    r"(^|\.)rotary_emb\.inv_freq$",  # RoPE buffers saved by older transformers
    r"^lm_head\.weight$",  # tied to model.embed_tokens (a tied checkpoint may still hold a copy)
)

# Parameters a checkpoint may lack: task heads (initialised, with a warning).
NEW_OK = (r"^score/", r"^lm_head/")
