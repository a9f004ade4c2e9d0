"""The tiny models' tokenizer: a byte-level BPE with a chat template, trained offline.

Trained deterministically on an embedded corpus, so every tiny model (and the
random benchmark model) gets the same tokenizer on every machine, with no download.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
# BpeTrainer gives special tokens the first ids, in this order
SPECIAL_TOKENS = (BOS_TOKEN, IM_START, EOS_TOKEN)
MAX_POSITIONS = 4096
_VOCAB_SIZE = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Embedded rather than read from the stdlib so the tokenizer is identical on
# every Python version.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun.
Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump!
Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.
Once upon a time there was a small model that streamed its experts from disk.
Each expert lived in its own file, and the router chose which ones to read.
When a token arrived, the router looked at it and picked the best experts.
The experts were loaded into memory, did their work, and were put away again.
Memory is precious on small devices, so only the hot experts stay resident.
A cache keeps recently used experts close at hand; cold ones are evicted.
Reading from a solid state drive is fast, but reading from memory is faster.
The coordinator schedules layers, the nodes hold weights, and tokens flow.
Hello, world! Hello there. How are you today? I am fine, thank you very much.
What is the capital of France? Paris is the capital of France.
What is two plus two? Two plus two is four. Three times three is nine.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024.
Symbols: ( ) [ ] { } < > = + - * / % & | ^ ~ ! ? @ # $ _ . , ; : ' " ` \\
def forward(self, x):
    h = self.embed(x)
    for layer in self.layers:
        h = layer(h)
    return self.norm(h)

class Expert:
    def __init__(self, index, weight):
        self.index = index
        self.weight = weight

if __name__ == "__main__":
    print("hello world")
    for i in range(10):
        print(i, i * i)

The system user assistant conversation begins here and ends there.
user: Please write a short poem about the sea.
assistant: The sea is wide, the sea is deep, it rocks the ships and sings to sleep.
user: Thanks! Now tell me a story about a robot.
assistant: A little robot learned to paint the sky in colours no one had seen.
Mixture of experts models have many experts but use only a few per token.
Sparse activation means the compute per token is small even if the model is large.
Quantization shrinks the weights to four bits, with scales and biases per group.
"""


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE with the chat's special tokens, trained deterministically on `texts`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer_files(tokenizer: Tokenizer, dst: Path) -> None:
    """`tokenizer` as mlx-lm loads it (HF fast format), with the chat template and special tokens."""
    tokenizer.save(str(dst / "tokenizer.json"), pretty=True)
    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": BOS_TOKEN, "unk_token": None}
    _write_json(dst / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": MAX_POSITIONS,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special_tokens,
    })
    _write_json(dst / "special_tokens_map.json", {k: v for k, v in special_tokens.items() if v is not None})


def write_tokenizer(dst: Path) -> None:
    """Write the tiny models' tokenizer (trained on the embedded corpus) to ``dst``."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    write_tokenizer_files(train_bpe(_CORPUS.splitlines(keepends=True), _VOCAB_SIZE), dst)
