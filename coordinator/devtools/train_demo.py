"""Train the built-in demo model: a small qwen3_moe on the Python standard library's sources.

    python -m edgemoe.coordinator.devtools.train_demo OUT_DIR [--steps N]

Everything is offline and deterministic: the training text is a fixed, sorted
list of standard-library modules present in every CPython 3.10+ install, the
byte-level BPE tokenizer is trained on that text, and the model is mlx-lm's own
``qwen3_moe`` ``Model`` class trained with AdamW from a fixed seed in a fixed
data order. The output is an mlx-lm model directory (config.json,
model.safetensors, tokenizer files with a chat template) whose routed experts
are quantized to 4 bits with float32 scales; dense weights stay float32.

The shipped copy lives in ``coordinator/demo_weights/``; ``train.json`` there
records the settings, the Python version whose stdlib was read, a hash of the
corpus and the loss curve. The same Python version and the same mlx build give
the same weights; other stdlib versions give slightly different text, hence a
slightly different (equally good) model.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model
from tokenizers import Tokenizer

from ..tiny_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_START,
    MAX_POSITIONS,
    SPECIAL_TOKENS,
    train_bpe,
    write_tokenizer_files,
)

# Present (as plain modules, not shims) in CPython 3.10 through 3.14.
STDLIB_FILES: tuple[str, ...] = tuple(sorted((
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py",
    "cmd.py", "code.py", "codeop.py", "collections/__init__.py", "colorsys.py",
    "configparser.py", "contextlib.py", "copy.py", "csv.py", "dataclasses.py",
    "difflib.py", "dis.py", "enum.py", "filecmp.py", "fileinput.py", "fnmatch.py",
    "fractions.py", "functools.py", "getopt.py", "gettext.py", "glob.py",
    "graphlib.py", "gzip.py", "hashlib.py", "heapq.py", "hmac.py", "inspect.py",
    "ipaddress.py", "json/__init__.py", "json/decoder.py", "json/encoder.py",
    "keyword.py", "linecache.py", "locale.py", "logging/__init__.py",
    "logging/handlers.py", "mimetypes.py", "numbers.py", "operator.py",
    "optparse.py", "os.py", "pickle.py", "pkgutil.py", "platform.py",
    "plistlib.py", "pprint.py", "pstats.py", "queue.py", "quopri.py", "random.py",
    "reprlib.py", "rlcompleter.py", "runpy.py", "sched.py", "secrets.py",
    "selectors.py", "shlex.py", "shutil.py", "signal.py", "smtplib.py",
    "socketserver.py", "statistics.py", "string.py", "subprocess.py",
    "tarfile.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py",
    "tokenize.py", "trace.py", "traceback.py", "types.py", "typing.py",
    "uuid.py", "wave.py", "weakref.py", "zipapp.py",
)))

SEED = 0
VOCAB_SIZE = 1024
SEQ_LEN = 128
BATCH_SIZE = 16
STEPS = 1200
WARMUP = 30
LEARNING_RATE = 3e-3
MIN_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.01
# share of training rows written as a chat turn (the user types the start of a
# line, the assistant continues it), so chat-templated prompts also read well
CHAT_FRACTION = 0.25
QUANT_GROUP_SIZE = 32
QUANT_BITS = 4

ARCH = dict(
    num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
    num_experts=32, num_experts_per_tok=4, moe_intermediate_size=64,
)


def read_corpus() -> list[str]:
    """The training text: one string per standard-library file, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in STDLIB_FILES:
        text = (root / name).read_text(encoding="utf-8")
        texts.append(text.replace("\r\n", "\n"))
    return texts


def train_tokenizer(texts: list[str]) -> Tokenizer:
    return train_bpe(texts, VOCAB_SIZE)


def model_config(vocab_size: int) -> dict[str, Any]:
    a = ARCH
    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": a["hidden_size"],
        "num_hidden_layers": a["num_layers"],
        "num_attention_heads": a["num_heads"],
        "num_key_value_heads": a["num_kv_heads"],
        "head_dim": a["head_dim"],
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "intermediate_size": 2 * a["hidden_size"],
        "num_experts": a["num_experts"],
        "num_experts_per_tok": a["num_experts_per_tok"],
        "moe_intermediate_size": a["moe_intermediate_size"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rope_scaling": None,
    }


def build_rows(texts: list[str], tokenizer: Tokenizer, rng: random.Random) -> np.ndarray:
    """Training rows of SEQ_LEN + 1 token ids, in a fixed shuffled order.

    Plain rows are consecutive windows of the token stream (files separated by
    the end-of-text token). Chat rows wrap the start of a source line as the
    user turn and the text that follows it as the assistant turn.
    """
    bos = tokenizer.token_to_id(BOS_TOKEN)
    eos = tokenizer.token_to_id(EOS_TOKEN)
    im_start = tokenizer.token_to_id(IM_START)
    assert bos is not None and eos is not None and im_start is not None  # special tokens of train_tokenizer
    stream: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        stream.extend(enc.ids)
        stream.append(bos)
    n = SEQ_LEN + 1
    rows = [stream[i:i + n] for i in range(0, len(stream) - n, SEQ_LEN)]

    user_prefix = tokenizer.encode("user\n").ids
    assistant_prefix = tokenizer.encode("assistant\n").ids
    newline = tokenizer.encode("\n").ids
    lines = [line for text in texts for line in text.split("\n")]
    starts = [i for i, line in enumerate(lines) if line.strip()]
    n_chat = int(len(rows) * CHAT_FRACTION / (1 - CHAT_FRACTION))
    for _ in range(n_chat):
        i = rng.choice(starts)
        line = lines[i].lstrip() if rng.random() < 0.5 else lines[i]
        cut = rng.randint(1, max(1, min(len(line), 24)))
        user, rest = line[:cut], line[cut:] + "\n" + "\n".join(lines[i + 1:i + 40])
        ids = ([im_start] + user_prefix + tokenizer.encode(user).ids + [eos] + newline
               + [im_start] + assistant_prefix + tokenizer.encode(rest).ids)
        ids = ids[:n]
        if len(ids) < n:
            ids = ids + [eos] + [bos] * (n - len(ids) - 1)
        rows.append(ids)
    rng.shuffle(rows)
    return np.array(rows, dtype=np.int32)


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LEARNING_RATE * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, steps - WARMUP)
    return LEARNING_RATE * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


def _quantize_experts(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """4-bit routed experts (float32 scales, since the model is float32); everything else float32."""
    def predicate(path: str, module: nn.Module) -> Any:
        return ".switch_mlp." in path
    with contextlib.redirect_stdout(io.StringIO()):
        _, config = quantize_model(model, config, group_size=QUANT_GROUP_SIZE, bits=QUANT_BITS,
                                   mode="affine", quant_predicate=predicate)
    return config


def train(out: Path, steps: int = STEPS, log=print) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    texts = read_corpus()
    corpus_sha = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    tokenizer = train_tokenizer(texts)
    rows = build_rows(texts, tokenizer, random.Random(SEED))
    log(f"corpus: {len(texts)} files, {sum(map(len, texts))} chars; {len(rows)} rows of {SEQ_LEN} tokens")

    config = model_config(tokenizer.get_vocab_size(with_added_tokens=True))
    mx.random.seed(SEED)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    n_params = sum(p.size for p in dict(tree_flatten(model.parameters())).values())
    log(f"model: {n_params} parameters")

    optimizer = optim.AdamW(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    pad = tokenizer.token_to_id(BOS_TOKEN)

    def loss_fn(m, x, y):
        logits = m(x)
        mask = (y != pad).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, y, reduction="none")
        return (ce * mask).sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step_fn(x, y):
        loss, grads = loss_and_grad(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss

    curve = []
    window = []
    model.train()
    for step in range(steps):
        optimizer.learning_rate = lr_at(step, steps)
        idx = [(step * BATCH_SIZE + j) % len(rows) for j in range(BATCH_SIZE)]
        batch = mx.array(rows[idx])
        loss = step_fn(batch[:, :-1], batch[:, 1:])
        mx.eval(loss, model.parameters(), optimizer.state)
        window.append(loss.item())
        if (step + 1) % 25 == 0 or step == 0:
            avg = sum(window) / len(window)
            curve.append([step + 1, round(avg, 4)])
            log(f"step {step + 1}/{steps} loss {avg:.3f} lr {lr_at(step, steps):.2e} "
                f"{time.perf_counter() - started:.0f}s")
            window = []
    model.eval()

    config = _quantize_experts(model, config)
    save_model(out, model)
    save_config(config, config_path=out / "config.json")
    write_tokenizer_files(tokenizer, out)
    meta = {
        "arch": ARCH, "seed": SEED, "steps": steps, "batch_size": BATCH_SIZE, "seq_len": SEQ_LEN,
        "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY, "chat_fraction": CHAT_FRACTION,
        "vocab_size": config["vocab_size"], "stdlib_files": list(STDLIB_FILES),
        "python": sys.version.split()[0], "corpus_sha256": corpus_sha,
        "train_tokens": steps * BATCH_SIZE * SEQ_LEN, "rows": len(rows),
        "seconds": round(time.perf_counter() - started, 1), "loss_curve": curve,
    }
    (out / "train.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output model directory")
    p.add_argument("--steps", type=int, default=STEPS)
    args = p.parse_args(argv)
    meta = train(args.out, args.steps)
    print(f"wrote {args.out} in {meta['seconds']}s, final loss {meta['loss_curve'][-1][1]}")


if __name__ == "__main__":
    main()
