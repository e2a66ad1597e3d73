"""A CLIP BPE tokenizer whose vocabulary is the shapes dataset's words, saved as standard vocab.json + merges.txt.

CLIP's BPE splits a word into characters (the last one carrying the end-of-word marker "</w>") and repeatedly
merges the adjacent pair with the lowest merge rank. `build_word_bpe` derives merge rules so that every dataset word
ends as one whole-word token, while any other text still tokenizes (into characters, which are in the vocabulary).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE loop: merge the lowest-ranked adjacent pair until no pair has a rank."""
    while len(symbols) > 1:
        pairs = [
            (ranks.get(pair, float("inf")), i)
            for i, pair in enumerate(zip(symbols, symbols[1:], strict=False))
        ]
        best_rank, i = min(pairs)
        if best_rank == float("inf"):
            break
        first, second = symbols[i], symbols[i + 1]
        merged, j = [], 0
        while j < len(symbols):
            if j < len(symbols) - 1 and symbols[j] == first and symbols[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def build_word_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merge rules under which each of `words` is a single token.

    A new merge is appended with the lowest priority, and only once the word's tokenization under the rules so far
    has stopped; earlier words always had a higher-ranked pair available at every step, so their tokenization is
    unchanged by later rules.

    Args:
        words: lower-case words without spaces.

    Returns:
        (token -> id, merges in rank order).
    """
    alphabet = sorted(set(string.ascii_lowercase + string.digits + "".join(words)))
    tokens = alphabet + [c + END_OF_WORD for c in alphabet]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + END_OF_WORD], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            symbols = _apply_merges(symbols, ranks)
    unique_tokens = list(dict.fromkeys(tokens)) + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(unique_tokens)}, merges


def write_bpe_files(words: list[str], directory: str | Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Write the standard CLIP tokenizer files vocab.json + merges.txt for `words` (diffusers' `save_pretrained`
    of a tokenizers-backed CLIPTokenizer writes only tokenizer.json; older loaders need these two).

    Args:
        words: the whole-word vocabulary.
        directory: output directory (created).

    Returns:
        (token -> id, merges in rank order).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_word_bpe(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=1) + "\n")
    # CLIP's merges.txt starts with a version line that the loader skips.
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab, merges


def save_word_tokenizer(words: list[str], directory: str | Path, model_max_length: int) -> CLIPTokenizer:
    """Write vocab.json + merges.txt for `words` and return the CLIPTokenizer loaded back from `directory`.

    Args:
        words: the whole-word vocabulary.
        directory: output directory (created); afterwards it holds the standard tokenizer files.
        model_max_length: sequence length the pipeline pads prompts to.
    """
    directory = Path(directory)
    vocab, merges = write_bpe_files(words, directory)
    # The pipeline pads with the end-of-text token, as Stable Diffusion's tokenizer does.
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    tokenizer.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)
