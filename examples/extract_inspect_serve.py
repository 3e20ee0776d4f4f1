"""The whole loop from the command line: extract a vector, inspect it, serve it, steer.

    python examples/extract_inspect_serve.py --model smollm2-135m-instruct --workdir /tmp/vsteer-example

Runs `vsteer extract` on the bundled sentiment pairs into a registry directory, prints
`vsteer inspect`, starts `vsteer serve` on it, sends one steered and one unsteered request
with the `openai` client, and stops the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def vsteer(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vsteer.cli.main", *args], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--layers", default="10")
    p.add_argument("--workdir", default="vsteer-example")
    p.add_argument("--serve-args", default="--enforce-eager --gpu-memory-utilization 0.3 --max-model-len 1024",
                   help="extra `vsteer serve` flags (the default suits a CPU machine)")
    args = p.parse_args()
    vectors = Path(args.workdir) / "vectors"
    vectors.mkdir(parents=True, exist_ok=True)

    vsteer("extract", "--model", args.model, "--pairs", "sentiment", "--layers", args.layers,
           "--token-position", "mean", "--out", str(vectors / "sentiment"), "--no-progress")
    vsteer("inspect", str(vectors / "sentiment"))

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vsteer.cli.main", "serve", args.model, "--vectors",
                               str(vectors), "--host", "127.0.0.1", "--port", str(port), *args.serve_args.split()],
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited with {server.returncode}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(1)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        question = [{"role": "user", "content": "What do you think of the new cafe in town?"}]
        for label, steering in (("unsteered", None), ("+sentiment", {"vectors": [{"name": "sentiment",
                                                                                 "strength": 4.0}]})):
            out = client.chat.completions.create(model=args.model, messages=question, max_tokens=24, temperature=0,
                                                 extra_body={"steering": steering} if steering else None)
            print(f"{label:>11}: {out.choices[0].message.content}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(120)


if __name__ == "__main__":
    main()
