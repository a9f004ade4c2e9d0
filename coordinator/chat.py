"""`edgemoe chat`: an interactive terminal chat with history, streamed replies and a status line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from .generate import GenerationResult, build_prompt, generate
from .status import nodes_in_use, save_last_run
from .streaming import StreamingModel

USER_PROMPT = "you> "
MODEL_PROMPT = "model> "
HELP = "type a message; /reset clears the history, /exit (or end of input) quits"


def _read_line(stdin: TextIO, stdout: TextIO) -> str:
    """One line of input after the prompt ('' at end of input); with line editing on a terminal."""
    if stdin is sys.stdin and stdout is sys.stdout and stdin.isatty():
        try:
            import readline  # noqa: F401  (gives input() history and editing)
        except ImportError:
            pass
        try:
            return input(USER_PROMPT) + "\n"
        except EOFError:
            return ""
    print(USER_PROMPT, end="", file=stdout, flush=True)
    return stdin.readline()


def status_line(result: GenerationResult, cluster: dict | None) -> str:
    """The line under a reply; `cluster` is the cluster's snapshot (None when running alone)."""
    s = result.stats
    used = nodes_in_use(cluster)
    where = f"nodes in use: {len(used)} ({', '.join(used)})" if used else "nodes in use: local only"
    if cluster is not None and not used:
        where += " (no node healthy)"
    return (f"[{s.generated_tokens} tokens | {s.tokens_per_s:.1f} tok/s | "
            f"cache hit rate {s.cache_hit_rate:.1%} | {where}]")


def run_chat(sm: StreamingModel, model_dir: Path | str, max_tokens: int = 512, temp: float = 0.0,
             seed: int | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Reads lines until /exit or end of input; returns how many replies were given."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    messages: list[dict] = []
    replies = 0
    print(HELP, file=stdout, flush=True)
    while True:
        line = _read_line(stdin, stdout)
        if not line:
            print(file=stdout, flush=True)
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            messages.clear()
            print("(history cleared)", file=stdout, flush=True)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        prompt = build_prompt(sm.tokenizer, messages)
        print(MODEL_PROMPT, end="", file=stdout, flush=True)
        result = generate(sm, prompt, max_tokens=max_tokens, temp=temp, seed=seed,
                          on_text=lambda chunk: print(chunk, end="", file=stdout, flush=True))
        cluster = sm.cluster.snapshot() if sm.cluster is not None else None
        print(file=stdout)
        print(status_line(result, cluster), file=stdout, flush=True)
        messages.append({"role": "assistant", "content": result.text})
        replies += 1
        save_last_run("chat", model_dir, {**result.stats.to_dict(), **(cluster or {})}, sm.dense_bytes,
                      nodes_in_use(cluster))
    return replies
