"""The output vocabulary: the tokenizer a merge writes, and each model's rows aligned to it."""
