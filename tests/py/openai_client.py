"""Drives `tandem-edge serve` with the official OpenAI Python client.

Usage: openai_client.py BASE_URL
Prints one JSON object: the non-streamed and streamed answers and usage.
"""
import datetime
import json
import sys
import typing
import urllib.request

import openai
import pydantic

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused-by-a-local-endpoint")
question = [{"role": "user", "content": "Name three colours."}]

whole = client.chat.completions.create(model="tandem", messages=question, max_tokens=24, temperature=0)
chunks = list(
    client.chat.completions.create(
        model="tandem",
        messages=question,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
usage = [c.usage for c in chunks if c.usage]
text = client.completions.create(model="tandem", prompt="The capital of France is", max_tokens=4, temperature=0)
models = [m.id for m in client.models.list()]

# Log-probabilities: chat's (whole and streamed) and completions' format.
def entries(content):
    return [
        {"token": t.token, "logprob": t.logprob, "bytes": t.bytes, "top": [[a.token, a.logprob] for a in t.top_logprobs]}
        for t in content
    ]

with_logprobs = client.chat.completions.create(
    model="tandem", messages=question, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3
)
streamed_logprobs = []
for c in client.chat.completions.create(
    model="tandem", messages=question, max_tokens=24, temperature=0, logprobs=True, top_logprobs=3, stream=True
):
    if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content:
        streamed_logprobs += entries(c.choices[0].logprobs.content)
text_logprobs = client.completions.create(model="tandem", prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
# As lm-evaluation-harness scores a continuation: echo, one new token,
# the prompt as text and as the token ids /tokenize gives (its
# `tokenized_requests`).
echoed = client.completions.create(model="tandem", prompt="The capital of France is", max_tokens=1, temperature=0, logprobs=1, echo=True)
# Two choices: the prompt's log-probabilities (asked for once) echoed with each.
echoed_twice = client.completions.create(model="tandem", prompt="The capital of France is", max_tokens=1, temperature=0, logprobs=1, echo=True, n=2)


def post(path, body):
    request = urllib.request.Request(sys.argv[1].removesuffix("/v1") + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request))


ids = post("/tokenize", {"prompt": "The capital of France is"})["tokens"]
echoed_ids = client.completions.create(model="tandem", prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True)

# vLLM's stop_token_ids: the answer ends on the first comma, unshown.
comma = post("/tokenize", {"prompt": ","})["tokens"]
at_comma = client.chat.completions.create(model="tandem", messages=question, max_tokens=24, temperature=0, extra_body={"stop_token_ids": comma})
at_comma_chunks = list(
    client.chat.completions.create(
        model="tandem", messages=question, max_tokens=24, temperature=0, stream=True, extra_body={"stop_token_ids": comma}
    )
)
# JSON mode.
as_json = client.chat.completions.create(
    model="tandem",
    messages=[{"role": "user", "content": "Describe a cat as JSON with the keys name, age and colour."}],
    max_tokens=96,
    temperature=0,
    response_format={"type": "json_object"},
)
# Structured outputs through the client's own helper: it sends the
# model's strict JSON Schema and parses the answer with Pydantic.
# Bounded strings: a 135M model can repeat a word inside a free string
# until max_tokens.
Word = typing.Annotated[str, pydantic.StringConstraints(max_length=24)]


class Cat(pydantic.BaseModel):
    # A pattern and a length together.
    name: str = pydantic.Field(pattern=r"^[A-Z][a-z]+$", max_length=12)
    age: int = pydantic.Field(ge=0, le=30)
    colour: typing.Literal["black", "white", "ginger"]
    nickname: typing.Optional[Word]
    toys: typing.List[Word] = pydantic.Field(max_length=3)
    # Constraints: bounds, a format, a pattern, a length.
    born: datetime.date
    chip: str = pydantic.Field(pattern=r"^[A-Z]{2}[0-9]{4}$")
    motto: str = pydantic.Field(max_length=20)
    weight_kg: float = pydantic.Field(gt=0, le=20)


structured = client.chat.completions.parse(
    model="tandem",
    messages=[{"role": "user", "content": "Describe a cat called Tom as JSON."}],
    max_tokens=192,
    temperature=0,
    response_format=Cat,
)

# Forced function calling through the client's helper: it builds a strict
# tool from the Pydantic model and parses the call's arguments with it.
cat_tool = openai.pydantic_function_tool(Cat, name="describe_cat", description="Records a cat.")
cat_question = [{"role": "user", "content": "Describe a cat called Tom."}]
forced = {"type": "function", "function": {"name": "describe_cat"}}
called = client.chat.completions.parse(model="tandem", messages=cat_question, max_tokens=192, temperature=0, tools=[cat_tool], tool_choice=forced)
called_chunks = list(
    client.chat.completions.create(model="tandem", messages=cat_question, max_tokens=192, temperature=0, tools=[cat_tool], tool_choice=forced, stream=True)
)
called_prompt = post("/tokenize", {"messages": cat_question, "tools": [cat_tool], "tool_choice": forced})["count"]
# `required` with two tools: the answer picks among them.
weather_tool = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False},
    },
}
weather_question = [{"role": "user", "content": "What is the weather like in Paris today?"}]
picked = client.chat.completions.create(
    model="tandem", messages=weather_question, max_tokens=192, temperature=0, tools=[cat_tool, weather_tool], tool_choice="required"
)
picked_chunks = list(
    client.chat.completions.create(
        model="tandem", messages=weather_question, max_tokens=192, temperature=0, tools=[cat_tool, weather_tool], tool_choice="required", stream=True
    )
)
# Parallel calls (the default): one or more in an answer, each streamed
# whole as it closes; without them, one.
two_cities = [{"role": "user", "content": "Weather in Paris and London?"}]
parallel = client.chat.completions.create(model="tandem", messages=two_cities, max_tokens=192, temperature=0, tools=[weather_tool], tool_choice="required")
parallel_chunks = list(
    client.chat.completions.create(model="tandem", messages=two_cities, max_tokens=192, temperature=0, tools=[weather_tool], tool_choice="required", stream=True)
)
single = client.chat.completions.create(
    model="tandem", messages=two_cities, max_tokens=192, temperature=0, tools=[cat_tool, weather_tool], tool_choice="required", parallel_tool_calls=False
)
# `auto` (the default with tools): a reply or calls, the model's choice.
auto = client.chat.completions.create(model="tandem", messages=weather_question, max_tokens=192, temperature=0, tools=[weather_tool])
auto_chunks = list(
    client.chat.completions.create(model="tandem", messages=weather_question, max_tokens=192, temperature=0, tools=[weather_tool], stream=True)
)


def streamed_calls(chunks):
    """Tool calls put together from their deltas: [index, id, name, arguments]."""
    calls = []
    for call in (call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])):
        if call.id:
            calls.append([call.index, call.id, call.function.name, ""])
        calls[call.index][3] += call.function.arguments or ""
    return calls


called_deltas = [call for c in called_chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]

# vLLM's guided_choice, and a regex under structured_outputs (vLLM 0.10's
# name for the guided_* fields), through extra_body as with vLLM.
chosen_word = client.chat.completions.create(
    model="tandem", messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}], max_tokens=8, temperature=0, extra_body={"guided_choice": ["yes", "no"]}
)
phone = client.chat.completions.create(
    model="tandem", messages=[{"role": "user", "content": "Give a phone number."}], max_tokens=24, temperature=0, extra_body={"structured_outputs": {"regex": r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"}}
)
# A GBNF grammar, as llama.cpp's server and vLLM's guided_grammar take it.
fruit_grammar = r"""root ::= item ("\n" item){1,2}
item ::= "- " [A-Z] [a-z]{1,12}   # one capitalized word"""
fruits = client.chat.completions.create(
    model="tandem", messages=[{"role": "user", "content": "Name three fruits."}], max_tokens=32, temperature=0, extra_body={"guided_grammar": fruit_grammar}
)

# n choices: sampled ones draw with seed + i; greedy ones are alike.
poem = [{"role": "user", "content": "Write a line about the sea."}]
several = client.chat.completions.create(model="tandem", messages=poem, max_tokens=12, temperature=1, seed=11, n=3)
several_chunks = list(
    client.chat.completions.create(
        model="tandem", messages=question, max_tokens=24, temperature=0, n=2, stream=True, stream_options={"include_usage": True}
    )
)

try:
    client.chat.completions.create(model="tandem", messages=question, temperature=5)
    refused = None
except openai.BadRequestError as e:
    refused = e.body.get("param") if isinstance(e.body, dict) else str(e.body)

print(
    json.dumps(
        {
            "whole": whole.choices[0].message.content,
            "whole_finish": whole.choices[0].finish_reason,
            "whole_usage": whole.usage.model_dump(),
            "streamed": streamed,
            "stream_chunks": len(chunks),
            "stream_finish": finish,
            "stream_usage": usage[0].model_dump() if usage else None,
            "completion": text.choices[0].text,
            "models": models,
            "refused_param": refused,
            "logprobs_text": with_logprobs.choices[0].message.content,
            "logprobs": entries(with_logprobs.choices[0].logprobs.content),
            "streamed_logprobs": streamed_logprobs,
            "completion_logprobs_text": text_logprobs.choices[0].text,
            "completion_logprobs": text_logprobs.choices[0].logprobs.model_dump(),
            "echo_text": echoed.choices[0].text,
            "echo_logprobs": echoed.choices[0].logprobs.model_dump(),
            "echo_twice_logprobs": [c.logprobs.model_dump() for c in echoed_twice.choices],
            "echo_ids_text": echoed_ids.choices[0].text,
            "echo_ids_logprobs": echoed_ids.choices[0].logprobs.model_dump(),
            "detokenized": post("/detokenize", {"tokens": ids})["prompt"],
            "comma": comma,
            "at_comma": [at_comma.choices[0].message.content, at_comma.choices[0].finish_reason, at_comma.usage.completion_tokens],
            "json_mode": [as_json.choices[0].message.content, as_json.choices[0].finish_reason],
            "structured": [structured.choices[0].message.content, structured.choices[0].finish_reason, structured.choices[0].message.parsed.model_dump(mode="json")],
            "tool_call": [
                called.choices[0].message.content,
                called.choices[0].finish_reason,
                [[t.type, t.function.name, t.function.arguments, t.function.parsed_arguments.model_dump(mode="json")] for t in called.choices[0].message.tool_calls],
                [called.usage.prompt_tokens, called_prompt, post("/tokenize", {"messages": cat_question})["count"]],
            ],
            "tool_call_streamed": [
                [[d.index, d.id, d.function.name] for d in called_deltas if d.id],
                "".join(d.function.arguments or "" for d in called_deltas),
                [c.choices[0].finish_reason for c in called_chunks if c.choices and c.choices[0].finish_reason],
                any(c.choices[0].delta.content for c in called_chunks if c.choices),
            ],
            "picked": [
                picked.choices[0].finish_reason,
                [[t.function.name, t.function.arguments] for t in picked.choices[0].message.tool_calls or []],
                [[c[2], c[3]] for c in streamed_calls(picked_chunks)],
            ],
            "parallel": [
                parallel.choices[0].finish_reason,
                [[t.function.name, t.function.arguments] for t in parallel.choices[0].message.tool_calls or []],
                streamed_calls(parallel_chunks),
                [[t.function.name, t.function.arguments] for t in single.choices[0].message.tool_calls or []],
            ],
            "auto": [
                [auto.choices[0].finish_reason],
                auto.choices[0].message.content or "",
                [[t.function.name, t.function.arguments] for t in auto.choices[0].message.tool_calls or []],
            ],
            "auto_streamed": [
                [c.choices[0].finish_reason for c in auto_chunks if c.choices and c.choices[0].finish_reason],
                "".join(c.choices[0].delta.content or "" for c in auto_chunks if c.choices),
                [[c[2], c[3]] for c in streamed_calls(auto_chunks)],
            ],
            "guided": [[chosen_word.choices[0].message.content, chosen_word.choices[0].finish_reason], [phone.choices[0].message.content, phone.choices[0].finish_reason], [fruits.choices[0].message.content, fruits.choices[0].finish_reason]],
            "at_comma_streamed": "".join(c.choices[0].delta.content or "" for c in at_comma_chunks if c.choices),
            "several": [[c.index, c.message.content, c.finish_reason] for c in several.choices],
            "several_tokens": several.usage.completion_tokens,
            "several_streamed": [
                "".join(c.choices[0].delta.content or "" for c in several_chunks if c.choices and c.choices[0].index == i) for i in range(2)
            ],
            "several_stream_roles": [c.choices[0].index for c in several_chunks if c.choices and c.choices[0].delta.role],
            "several_stream_finish": [[c.choices[0].index, c.choices[0].finish_reason] for c in several_chunks if c.choices and c.choices[0].finish_reason],
            "several_stream_tokens": [c.usage.completion_tokens for c in several_chunks if c.usage],
        }
    )
)
