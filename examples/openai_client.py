"""Steering through the official `openai` client: chat, completions and streaming.

    vsteer serve smollm2-135m-instruct --vectors ./vectors        # a server with a "formal" set
    python examples/openai_client.py --base-url http://localhost:8000/v1 --vector formal

Steering goes in ``extra_body={"steering": ...}``; what was applied comes back in the
``x-vsteer-steering`` header and, for non-streaming responses, a ``steering`` field.
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://localhost:8000/v1")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--vector", default="formal", help="a name in the server's registry")
    p.add_argument("--api-key", default="unused")
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    steering = {"vectors": [{"name": args.vector, "strength": 4.0}], "positions": "generated"}

    # chat, steered; .with_raw_response also gives the headers
    raw = client.chat.completions.with_raw_response.create(
        model=args.model, messages=[{"role": "user", "content": "How was your day?"}], max_tokens=24,
        temperature=0, extra_body={"steering": steering})
    chat = raw.parse()
    print("chat:", chat.choices[0].message.content)
    print("  applied:", chat.model_extra["steering"]["fingerprint"], raw.headers["x-vsteer-steering"])

    # completions, two operators at once: remove one direction, add another
    both = {"vectors": [{"name": args.vector, "op": "ablate"}, {"name": args.vector, "strength": 2.0,
                                                                  "norm": "preserve"}]}
    completion = client.completions.create(model=args.model, prompt="The weather today is", max_tokens=16,
                                           temperature=0, extra_body={"steering": both})
    print("completion:", completion.choices[0].text)

    # streaming: the steering is validated before the stream starts (a bad spec is a 400)
    stream = client.chat.completions.create(
        model=args.model, messages=[{"role": "user", "content": "Tell me about the sea."}], max_tokens=24,
        temperature=0, stream=True, extra_body={"steering": steering})
    print("stream:", "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))

    # unsteered: no steering field (or "steering": null) is a stock vLLM request
    plain = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "How was your day?"}],
                                           max_tokens=24, temperature=0)
    print("unsteered:", plain.choices[0].message.content)


if __name__ == "__main__":
    main()
