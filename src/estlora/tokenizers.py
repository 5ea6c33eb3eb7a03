"""CLIP tokenizers built in code, offline: the byte table CLIP's BPE starts from, and a character-level
tokenizer for tiny test models (the toy world builds its word-level one from the same table)."""

from __future__ import annotations


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's byte -> printable-unicode table, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A character-level CLIP tokenizer (514 tokens, no merges), built offline."""
    from transformers import CLIPTokenizer

    chars = bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token=pad_token)
