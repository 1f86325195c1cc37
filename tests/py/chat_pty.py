"""Drives `tandem-edge chat` through a pseudo-terminal like a person would.

Usage: chat_pty.py TANDEM_EDGE_ARGS...
Asks one question and waits for the answer, asks for /stats, starts a long
answer and presses Ctrl-C during it, checks the program is still there with
/stats, then quits with /exit. Prints the whole transcript as JSON.
"""
import json
import os
import pty
import select
import sys
import time

pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])

transcript = b""


def read_until(marker, timeout):
    """Reads until the transcript ends with `marker` (after what it had)."""
    global transcript
    start = len(transcript)
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            transcript += chunk
            if marker in transcript[start:]:
                return True
    return False


def send(text):
    os.write(fd, text.encode())


steps = {}
steps["banner"] = read_until(b"> ", 120)
send("Name a colour.\r")
steps["answer"] = read_until(b"\r\n> ", 120)
send("/stats\r")
steps["stats"] = read_until(b"\r\n> ", 30)
send("Write a long story about a dragon who learns to cook.\r")
# Press Ctrl-C while the answer is being written.
read_until(b"cook.\r\n", 30)
read_until(b"\x00", 1.5)
send("\x03")
steps["stopped"] = read_until(b"[stopped]\r\n> ", 60)
send("/stats\r")
steps["stats_after_stop"] = read_until(b"\r\n> ", 30)
send("/exit\r")
deadline = time.time() + 30
status = None
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    read_until(b"\x00", 0.2)
print(json.dumps({"steps": steps, "exit_status": status, "transcript": transcript.decode("utf-8", "replace")}))
