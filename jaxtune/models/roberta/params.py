"""RoBERTa's HF <-> jaxtune key table (module names mirror transformers; DEFAULT_RULES do the rest)."""

KEY_RULES = ()

# Buffers and tied copies found in HF checkpoints that are not parameters here.
IGNORE_KEYS = (
    r"(^|\.)embeddings\.position_ids$",
    r"(^|\.)embeddings\.token_type_ids$",
    r"^lm_head\.decoder\.(weight|bias)$",  # tied to word embeddings / lm_head.bias
)

# Parameters a checkpoint may lack: task heads and the pooler (initialised, with a warning).
NEW_OK = (r"^classifier/", r"^lm_head/", r"(^|/)pooler/")
