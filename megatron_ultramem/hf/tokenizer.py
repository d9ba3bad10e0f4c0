"""Tokenizer files for an exported folder, from what the training run used.

- the main job's byte tokenizer (token id = UTF-8 byte, vocabulary 256, newline ends a document):
  a `tokenizers` byte-level model with exactly those 256 ids and no merges, so AutoTokenizer
  encodes any text to its bytes; newline (id 10) is its end-of-sequence and padding token;
- Megatron-LM's GPT2BPETokenizer: its vocab.json / merges.txt as a GPT-2 tokenizer;
- HuggingFaceTokenizer with a local folder: that tokenizer, saved again.
Anything else (a hub name that would need a download, SentencePiece, NullTokenizer) is reported,
and the model is exported without tokenizer files.
"""

import os
from typing import Dict, Optional


def byte_tokenizer():
    """A PreTrainedTokenizerFast whose ids are the UTF-8 bytes of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte <-> printable-character table (what the ByteLevel pre-tokenizer emits)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = chars[10]  # newline: the corpus's end of document
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, model_max_length=10**9)


def write_tokenizer(info: Dict, folder: str) -> Optional[str]:
    """Write the tokenizer files into `folder`; returns a note when none could be written."""
    kind = info.get("type")
    if not kind:
        return "no tokenizer recorded in the checkpoint (token ids only)"
    if kind == "bytes":
        byte_tokenizer().save_pretrained(folder)
        return None
    if kind == "GPT2BPETokenizer":
        vocab, merges = info.get("vocab_file"), info.get("merge_file")
        if not (vocab and merges and os.path.isfile(vocab) and os.path.isfile(merges)):
            return f"GPT2BPETokenizer files not found here ({vocab}, {merges}): tokenizer not exported"
        from transformers import GPT2TokenizerFast

        GPT2TokenizerFast(vocab_file=vocab, merges_file=merges).save_pretrained(folder)
        return None
    if kind == "HuggingFaceTokenizer":
        model = info.get("model")
        if not (model and os.path.isdir(model)):
            return (f"HuggingFaceTokenizer {model!r} is not a local folder (no downloads here): tokenizer "
                    "not exported; save it into the folder with AutoTokenizer.save_pretrained")  # fmt: skip
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model).save_pretrained(folder)
        return None
    return f"tokenizer type {kind} is not exported (supported: the main job's bytes, GPT2BPETokenizer, a local HuggingFaceTokenizer)"
