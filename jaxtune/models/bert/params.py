"""BERT's HF <-> jaxtune key table.

Module names mirror transformers, so the shared DEFAULT_RULES (kernel/embedding/scale -> weight,
kernels transposed) cover every parameter; what is left is what to ignore and what may start fresh.
"""

KEY_RULES = ()

# Buffers and tied copies found in HF checkpoints that are not parameters here.
IGNORE_KEYS = (
    r"(^|\.)embeddings\.position_ids$",
    r"(^|\.)embeddings\.token_type_ids$",
    r"^cls\.predictions\.decoder\.(weight|bias)$",  # tied to word embeddings / predictions.bias
    r"^cls\.seq_relationship\.",  # BertForPreTraining's NSP head
)

# Parameters a checkpoint may lack: task heads and the pooler (initialised, with a warning).
NEW_OK = (r"^classifier/", r"^cls/", r"(^|/)pooler/")
