"""`edgemoe chat` through a pipe and a real terminal (tmux), and `edgemoe status` before and after a run."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, cli_env, mlx_lm_tokens, run_cli

CHAT_TOKENS = 10
STATUS_RE = re.compile(r"^\[\d+ tokens \| [\d.]+ tok/s \| cache hit rate [\d.]+% \| nodes in use: local only\]$",
                       re.MULTILINE)


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "edgemoe-home"
    monkeypatch.setenv("EDGEMOE_HOME", str(path))
    return path


def env_with_home(home) -> dict[str, str]:
    env = cli_env()
    env["EDGEMOE_HOME"] = str(home)
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def reference_replies(models) -> tuple[str, str, list[int]]:
    """mlx-lm's greedy replies to 'hi', then to 'and more' with the first turn in the chat-templated history."""
    src = models.src("qwen3_moe", True)
    tokenizer = models.mlx_lm_model(src)[1]
    first_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    _, first = mlx_lm_tokens(src, list(first_prompt), max_tokens=CHAT_TOKENS, models=models)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "and more"}]
    second_prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
    second_ids, second = mlx_lm_tokens(src, list(second_prompt), max_tokens=CHAT_TOKENS, models=models)
    return first, second, second_ids


def test_chat_through_a_pipe_matches_mlx_lm(models, home):
    packed = models.packed("qwen3_moe", True)
    proc = subprocess.run(
        [sys.executable, "-m", "edgemoe.coordinator.cli", "chat", "--model", str(packed), "--peers", "none",
         "--max-tokens", str(CHAT_TOKENS)],
        input="hi\nand more\n/exit\n", capture_output=True, text=True, encoding="utf-8", timeout=120,
        env=env_with_home(home), cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("model> ") == 2, out
    assert len(STATUS_RE.findall(out)) == 2, out
    first, second, second_ids = reference_replies(models)
    # Each reply is streamed after the model prompt and followed by its status line.
    assert f"you> model> {first}\n[" in out, (first, out)
    assert f"you> model> {second}\n[" in out, (second, out)
    # The chat recorded its last reply for `edgemoe status`.
    record = json.loads((home / "last-run.json").read_text())
    assert record["command"] == "chat" and record["stats"]["generated_tokens"] == len(second_ids)


def test_chat_reset_and_eof(models, home):
    packed = models.packed("qwen3_moe", True)
    proc = subprocess.run(
        [sys.executable, "-m", "edgemoe.coordinator.cli", "chat", "--model", str(packed), "--peers", "none",
         "--max-tokens", str(CHAT_TOKENS)],
        input="hi\n/reset\nhi\n", capture_output=True, text=True, encoding="utf-8", timeout=120,
        env=env_with_home(home), cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(history cleared)" in proc.stdout
    replies = re.findall(r"model> (.*?)\n\[", proc.stdout, re.DOTALL)
    # After /reset the same question gets the same (greedy) answer as the first time.
    assert len(replies) == 2 and replies[0] == replies[1], proc.stdout


@pytest.mark.requires_tool("tmux")
def test_chat_in_a_real_terminal(models, home, tmp_path):
    packed = models.packed("qwen3_moe", True)
    socket = tmp_path / "tmux.sock"  # a private server, removed with tmp_path
    if len(str(socket)) > 100:  # a Unix socket path must fit in sun_path
        socket = Path(tempfile.mkdtemp(prefix="em-tmux-")) / "s"
    env = env_with_home(home)
    command = shlex.join(["env", *(f"{k}={env[k]}" for k in ("EDGEMOE_HOME", "PYTHONIOENCODING")),
                          sys.executable, "-m", "edgemoe.coordinator.cli", "chat", "--model", str(packed),
                          "--peers", "none", "--max-tokens", str(CHAT_TOKENS)])
    tmux = ["tmux", "-S", str(socket), "-f", "/dev/null"]

    def pane() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True).stdout

    def wait_for(predicate, seconds=60.0) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            screen = pane()
            if predicate(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"timed out; the screen:\n{pane()}")

    subprocess.run([*tmux, "new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", "-c", str(REPO), command],
                   check=True, env=env)
    try:
        wait_for(lambda s: "you>" in s)  # capture-pane drops trailing spaces
        subprocess.run([*tmux, "send-keys", "-t", "chat", "hi", "Enter"], check=True)
        screen = wait_for(lambda s: "nodes in use: local only]" in s)
        # On a terminal the typed line is echoed, and the reply starts on the next line.
        assert "you> hi" in screen and "model> " in screen
        assert re.search(r"\[\d+ tokens \| [\d.]+ tok/s \| cache hit rate", screen), screen
        wait_for(lambda s: s.rstrip().endswith("you>"))
        subprocess.run([*tmux, "send-keys", "-t", "chat", "/exit", "Enter"], check=True)
        deadline = time.monotonic() + 30
        while subprocess.run([*tmux, "has-session", "-t", "chat"], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "chat did not exit on /exit"
            time.sleep(0.1)
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        if socket.parent != tmp_path:
            shutil.rmtree(socket.parent, ignore_errors=True)


def test_status_before_and_after_a_generation(models, home):
    packed = models.packed("qwen3_moe", True)
    env_home = str(home)
    assert os.environ["EDGEMOE_HOME"] == env_home  # run_cli passes the environment on

    before = run_cli("status", "--peers", "none")
    assert before.returncode == 0, before.stderr
    assert "no generation yet" in before.stdout
    assert "edgemoe 0.1.0" in before.stdout
    before_json = json.loads(run_cli("status", "--json", "--peers", "none").stdout)
    assert before_json["last_run"] is None and before_json["nodes"] == []

    gen = run_cli("generate", "--model", packed, "--prompt", "hello", "--max-tokens", "6", "--peers", "none", "--json")
    assert gen.returncode == 0, gen.stderr
    stats = json.loads(gen.stdout)["stats"]

    after = json.loads(run_cli("status", "--json", "--peers", "none").stdout)
    assert after["last_run"]["stats"] == stats
    assert after["last_run"]["command"] == "generate" and after["last_run"]["model"] == str(packed)
    c = after["coordinator"]
    assert c["cache_bytes_used"] == stats["cache_bytes_used"] and c["dense_bytes"] > 0
    for key in ("tokens_per_s", "cache_hit_rate", "generated_tokens", "ssd_bytes_read"):
        assert key in after["last_run"]["stats"]

    text = run_cli("status", "--peers", "none")
    assert text.returncode == 0, text.stderr
    assert "no generation yet" not in text.stdout
    assert f"{stats['generated_tokens']} at {stats['tokens_per_s']:.2f} tok/s" in text.stdout
    assert f"hit rate {stats['cache_hit_rate']:.1%}" in text.stdout
    assert "local only" in text.stdout
