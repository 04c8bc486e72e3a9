#!/usr/bin/env python3
"""Prepare the King James Bible corpus and the BPE tokenizer for the embedded model.

Runs on a CPU machine (no torch needed):

    apt-get install -y bible-kjv          # Debian's bible-kjv + bible-kjv-text (public domain)
    bible "Gen1:1-Rev22:21" > kjv.txt
    python3 tools/prep_corpus.py --kjv kjv.txt --out .dev/kjv

Output (in --out):
    train.txt          training split (every chapter whose index % 20 != 19)
    val.txt            held-out split (every 20th chapter: index % 20 == 19, 0-based)
    kjv-heldout.txt    a contiguous ~60 KB excerpt of val.txt (whole chapters), shipped for `aimc eval`
    tokenizer.json     byte-level BPE, vocab 4096, special token <|endoftext|> (id 0)
    corpus.json        statistics

Text format: the `bible` tool prints "Book N" headers and verses as "  V text" wrapped at ~80 columns.
We keep one chapter as a block: its header line ("Genesis 1"), then one verse per line with the verse
number removed and the wrapping undone. Chapters are separated by a blank line.
"""
import argparse
import json
import os
import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOT = "<|endoftext|>"


def parse_chapters(raw: str):
    lines = raw.split("\n")
    hdr = [
        i
        for i, l in enumerate(lines)
        if re.match(r"^\S.* \d+$", l) and (i == 0 or lines[i - 1] == "") and i + 1 < len(lines) and lines[i + 1] == ""
    ]
    chapters = []
    for n, h in enumerate(hdr):
        end = hdr[n + 1] if n + 1 < len(hdr) else len(lines)
        body = lines[h + 1 : end]
        verses = []
        for l in body:
            if not l.strip():
                continue
            m = re.match(r"^\s+(\d+) (.*)$", l)
            if m:
                verses.append(m.group(2).strip())
            else:  # continuation of a wrapped verse
                assert verses, (lines[h], l)
                verses[-1] += " " + l.strip()
        chapters.append(lines[h] + "\n" + "\n".join(verses) + "\n")
    return chapters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kjv", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--heldout-bytes", type=int, default=60_000)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    chapters = parse_chapters(open(a.kjv, encoding="utf-8").read())
    assert len(chapters) == 1189, len(chapters)
    train = [c for i, c in enumerate(chapters) if i % 20 != 19]
    val = [c for i, c in enumerate(chapters) if i % 20 == 19]
    train_txt = "\n".join(train)
    val_txt = "\n".join(val)
    open(os.path.join(a.out, "train.txt"), "w").write(train_txt)
    open(os.path.join(a.out, "val.txt"), "w").write(val_txt)

    # ~60 KB contiguous excerpt of the held-out split, whole chapters, starting in the middle of it
    start = len(val) // 3
    exc = []
    for c in val[start:]:
        exc.append(c)
        if len("\n".join(exc)) >= a.heldout_bytes:
            break
    heldout = "\n".join(exc)
    open(os.path.join(a.out, "kjv-heldout.txt"), "w").write(heldout)

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=a.vocab,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train, trainer=trainer, length=len(train))
    path = os.path.join(a.out, "tokenizer.json")
    tok.save(path)

    # checks: round trip and vocab size
    tok2 = Tokenizer.from_file(path)
    assert tok2.get_vocab_size() == a.vocab, tok2.get_vocab_size()
    assert tok2.token_to_id(EOT) == 0
    for t in (val_txt[:5000], heldout, "Hello, wörld! ‘quotes’ 123\n\n  x"):
        ids = tok2.encode(t).ids
        back = tok2.decode(ids)
        assert back == t, (t[:200], back[:200])
    n_train = len(tok2.encode(train_txt).ids)
    n_val = len(tok2.encode(val_txt).ids)
    n_held = len(tok2.encode(heldout).ids)
    stats = dict(
        chapters=len(chapters),
        train_chapters=len(train),
        val_chapters=len(val),
        split_rule="chapter index (0-based, Genesis 1 = 0) % 20 == 19 -> held out",
        train_bytes=len(train_txt.encode()),
        val_bytes=len(val_txt.encode()),
        heldout_excerpt_bytes=len(heldout.encode()),
        heldout_excerpt_chapters=[c.split("\n", 1)[0] for c in exc],
        train_tokens=n_train,
        val_tokens=n_val,
        heldout_excerpt_tokens=n_held,
        vocab=tok2.get_vocab_size(),
        bytes_per_token_train=len(train_txt.encode()) / n_train,
    )
    json.dump(stats, open(os.path.join(a.out, "corpus.json"), "w"), indent=1)
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
