"""DistilBERT's HF <-> jaxtune key table (module names mirror transformers; DEFAULT_RULES do the rest)."""

KEY_RULES = ()

# Buffers and tied copies found in HF checkpoints that are not parameters here.
IGNORE_KEYS = (
    r"(^|\.)embeddings\.position_ids$",
    r"^vocab_projector\.weight$",  # tied to the word embeddings
)

# Parameters a checkpoint may lack: task heads (initialised, with a warning).
NEW_OK = (r"^pre_classifier/", r"^classifier/", r"^vocab_(transform|layer_norm|projector)/")
