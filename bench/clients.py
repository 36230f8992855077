"""The everyday calls of the OpenAI clients people use, against ``edgeroute serve``: what works, what is refused.

Each client is driven the way its own docs show (plain chat, streaming with usage, structured output with a
pydantic model, tools and the tool loop, the Responses API where the client has it) against a server on a free
port of 127.0.0.1, and each call is reported as ``ok`` (with what came back) or with the error the client raised.
The clients live in their own environment (they pin their own ``openai``):

    python3 -m venv /tmp/clients && /tmp/clients/bin/pip install langchain-openai litellm instructor \\
        'pydantic-ai-slim[openai]' openai-agents
    /tmp/clients/bin/python bench/clients.py models/smollm2-135m --edgeroute .venv/bin/edgeroute

Writes a Markdown table (``--out``) with each client's version.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata as md
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from serve import Server, free_port  # bench/serve.py

MODEL = "m"
MAX = 96  # tokens an answer may take, where the client lets one say so
LONG = 160  # for JSON the model writes unconstrained (instructor's JSON modes)


class City(BaseModel):
    name: str
    country: str


def weather(city: str) -> str:
    """The weather in a city."""
    return f"Sunny in {city}."


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = "What is the capital of France?"
ASK_TOOL = "What is the weather in Paris? Use the weather tool."


# -- the official openai client ----------------------------------------------------------------------------------
def openai_calls(base: str) -> dict[str, Callable[[], Any]]:
    from openai import OpenAI

    c = OpenAI(base_url=base + "/v1", api_key="none")
    msgs: list[Any] = [{"role": "user", "content": ASK}]

    def stream() -> str:
        chunks = list(
            c.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=MAX, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        return f"{text[:40]!r}, usage {chunks[-1].usage.completion_tokens if chunks[-1].usage else None}"

    def parse() -> str:
        r = c.chat.completions.parse(model=MODEL, messages=msgs, response_format=City, max_tokens=MAX)
        return repr(r.choices[0].message.parsed)

    def tool_loop() -> str:
        history: list[Any] = [{"role": "user", "content": ASK_TOOL}]
        r = c.chat.completions.create(
            model=MODEL, messages=history, tools=[WEATHER_TOOL], tool_choice="required", max_tokens=MAX
        )
        message = r.choices[0].message
        history.append(message)  # the SDK's own message, as OpenAI's docs do
        for call in message.tool_calls or []:
            args = json.loads(call.function.arguments)
            history.append({"role": "tool", "tool_call_id": call.id, "content": weather(**args)})
        r = c.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER_TOOL], max_tokens=MAX)
        return f"{message.tool_calls[0].function.arguments if message.tool_calls else None} -> " + repr(
            (r.choices[0].message.content or "")[:40]
        )

    def responses_parse() -> str:
        r = c.responses.parse(model=MODEL, input=ASK, text_format=City, max_output_tokens=MAX)
        return repr(r.output_parsed)

    def responses_stream() -> str:
        events = list(c.responses.create(model=MODEL, input=ASK, max_output_tokens=MAX, stream=True))
        return f"{len(events)} events, last {events[-1].type}"

    return {
        "chat": lambda: (
            c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=MAX).choices[0].message.content
        ),
        "chat, streamed with usage": stream,
        "chat, n=2 + logprobs + seed": lambda: len(
            c.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=8, n=2, logprobs=True, top_logprobs=2, seed=1
            ).choices
        ),
        "chat.completions.parse (pydantic)": parse,
        "tools: the tool loop": tool_loop,
        "completions": lambda: (
            c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8).choices[0].text
        ),
        "models.retrieve": lambda: c.models.retrieve(MODEL).id,
        "responses.parse (pydantic)": responses_parse,
        "responses, streamed": responses_stream,
    }


# -- LangChain ---------------------------------------------------------------------------------------------------
def langchain_calls(base: str) -> dict[str, Callable[[], Any]]:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key="none", max_tokens=MAX, temperature=0)  # type: ignore[arg-type]

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return weather(city)

    def tool_loop() -> str:
        bound = llm.bind_tools([get_weather], tool_choice="get_weather")
        msgs: list[Any] = [HumanMessage(ASK_TOOL)]
        ai = bound.invoke(msgs)
        msgs.append(ai)
        for call in ai.tool_calls:
            msgs.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
        final = llm.bind_tools([get_weather]).invoke(msgs)
        return f"{ai.tool_calls[0]['args'] if ai.tool_calls else None} -> {str(final.content)[:40]!r}"

    def stream() -> str:
        chunks = list(
            ChatOpenAI(model=MODEL, base_url=base + "/v1", api_key="none", max_tokens=MAX, stream_usage=True).stream(
                ASK
            )
        )  # type: ignore[arg-type]
        usage = next((ch.usage_metadata for ch in chunks if ch.usage_metadata), None)
        return f"{''.join(str(ch.content) for ch in chunks)[:40]!r}, usage {usage}"

    return {
        "invoke": lambda: llm.invoke(ASK).content,
        "stream with usage": stream,
        "batch": lambda: [str(m.content)[:20] for m in llm.batch([ASK, "Say hi."])],
        "with_structured_output (json_schema)": lambda: llm.with_structured_output(City).invoke(ASK),
        "with_structured_output (function_calling)": lambda: llm.with_structured_output(
            City, method="function_calling"
        ).invoke(ASK),
        "with_structured_output (json_mode)": lambda: llm.with_structured_output(City, method="json_mode").invoke(
            ASK + " Answer in JSON with name and country."
        ),
        "bind_tools: the tool loop": tool_loop,
        "use_responses_api": lambda: (
            ChatOpenAI(
                model=MODEL,
                base_url=base + "/v1",
                api_key="none",
                max_tokens=MAX,
                use_responses_api=True,  # type: ignore[arg-type]
            )
            .invoke(ASK)
            .content
        ),
    }


# -- LiteLLM -----------------------------------------------------------------------------------------------------
def litellm_calls(base: str) -> dict[str, Callable[[], Any]]:
    import litellm

    kw: dict[str, Any] = {"model": "openai/" + MODEL, "api_base": base + "/v1", "api_key": "none", "max_tokens": MAX}
    msgs = [{"role": "user", "content": ASK}]

    def stream() -> str:
        chunks = list(litellm.completion(messages=msgs, stream=True, stream_options={"include_usage": True}, **kw))
        return repr("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)[:40])

    def tools() -> str:
        r = litellm.completion(
            messages=[{"role": "user", "content": ASK_TOOL}], tools=[WEATHER_TOOL], tool_choice="required", **kw
        )
        return r.choices[0].message.tool_calls[0].function.arguments

    return {
        "completion": lambda: litellm.completion(messages=msgs, **kw).choices[0].message.content,
        "completion, streamed": stream,
        "response_format (pydantic)": lambda: (
            litellm.completion(messages=msgs, response_format=City, **kw).choices[0].message.content
        ),
        "tools": tools,
        "text_completion": lambda: litellm.text_completion(prompt="The capital of France is", **kw).choices[0].text,
    }


# -- instructor --------------------------------------------------------------------------------------------------
def instructor_calls(base: str) -> dict[str, Callable[[], Any]]:
    import instructor
    from openai import OpenAI

    def make(mode: Any) -> Callable[[], Any]:
        client = instructor.from_openai(OpenAI(base_url=base + "/v1", api_key="none"), mode=mode)
        return lambda: client.chat.completions.create(
            model=MODEL,
            response_model=City,
            messages=[{"role": "user", "content": ASK}],
            max_tokens=LONG,
            max_retries=1,
        )

    return {
        f"mode {m.name}": make(m)
        for m in (instructor.Mode.TOOLS, instructor.Mode.JSON, instructor.Mode.JSON_SCHEMA, instructor.Mode.MD_JSON)
    }


# -- pydantic-ai -------------------------------------------------------------------------------------------------
def pydantic_ai_calls(base: str) -> dict[str, Callable[[], Any]]:
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider
    from pydantic_ai.settings import ModelSettings

    provider = OpenAIProvider(base_url=base + "/v1", api_key="none")
    chat = OpenAIChatModel(MODEL, provider=provider)
    settings = ModelSettings(max_tokens=MAX)

    def tools() -> str:
        agent = Agent(chat, model_settings=settings)
        agent.tool_plain(weather)
        return str(agent.run_sync(ASK_TOOL).output)[:60]

    async def streamed() -> str:
        async with Agent(chat, model_settings=settings).run_stream(ASK) as run:
            return repr((await run.get_output())[:40])

    return {
        "run_sync": lambda: Agent(chat, model_settings=settings).run_sync(ASK).output,
        "output_type (pydantic)": lambda: Agent(chat, output_type=City, model_settings=settings).run_sync(ASK).output,
        "tools": tools,
        "run_stream": lambda: asyncio.run(streamed()),
        "Responses model": lambda: (
            Agent(OpenAIResponsesModel(MODEL, provider=provider), model_settings=settings).run_sync(ASK).output
        ),
    }


# -- OpenAI's agents SDK -----------------------------------------------------------------------------------------
def agents_calls(base: str) -> dict[str, Callable[[], Any]]:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=base + "/v1", api_key="none")
    chat = OpenAIChatCompletionsModel(model=MODEL, openai_client=client)
    settings = ModelSettings(max_tokens=MAX)

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return weather(city)

    def run(agent: Any, text: str = ASK) -> Any:
        return Runner.run_sync(agent, text, max_turns=3).final_output

    return {
        "Runner.run_sync": lambda: run(Agent(name="a", instructions="Be brief.", model=chat, model_settings=settings)),
        "output_type (pydantic)": lambda: run(
            Agent(name="a", instructions="Be brief.", model=chat, output_type=City, model_settings=settings)
        ),
        "function_tool": lambda: run(
            Agent(name="a", instructions="Use tools.", model=chat, tools=[get_weather], model_settings=settings),
            ASK_TOOL,
        ),
        "Responses model": lambda: run(
            Agent(
                name="a",
                instructions="Be brief.",
                model=OpenAIResponsesModel(model=MODEL, openai_client=client),
                model_settings=settings,
            )
        ),
    }


CLIENTS: dict[str, tuple[str, Callable[[str], dict[str, Callable[[], Any]]]]] = {
    "openai": ("openai", openai_calls),
    "LangChain": ("langchain-openai", langchain_calls),
    "LiteLLM": ("litellm", litellm_calls),
    "instructor": ("instructor", instructor_calls),
    "pydantic-ai": ("pydantic-ai-slim", pydantic_ai_calls),
    "agents SDK": ("openai-agents", agents_calls),
}


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="an exported model folder")
    ap.add_argument("--edgeroute", default="edgeroute", help="the edgeroute command (its environment's)")
    ap.add_argument("--only", nargs="*", help="clients to run (default: all)")
    ap.add_argument("--out", help="write the table here (Markdown)")
    ap.add_argument("--traceback", action="store_true")
    a = ap.parse_args()
    port = free_port()
    server = Server("clients", [a.edgeroute, "serve", a.model, "--port", str(port), "--model-name", MODEL], port)
    rows = []
    try:
        for client, (package, calls) in CLIENTS.items():
            if a.only and client not in a.only:
                continue
            version = md.version(package)
            for name, call in calls(server.url).items():
                try:
                    result, status = call(), "ok"
                    detail = repr(result)[:100]
                except Exception as e:  # a client's refusal or a server error: the row says which
                    status, detail = "fails", one_line(e)
                    if a.traceback:
                        traceback.print_exc()
                rows.append((f"{client} {version}", name, status, detail))
                print(f"{client:12} {name:45} {status:5} {detail}", flush=True)
    finally:
        server.stop()
    table = ["| client | call | result | what came back |", "| --- | --- | --- | --- |"]
    table += [f"| {c} | {n} | {s} | {d.replace('|', '/')} |" for c, n, s, d in rows]
    if a.out:
        Path(a.out).write_text("\n".join(table) + "\n", encoding="utf-8")
    failed = sum(s != "ok" for _, _, s, _ in rows)
    print(f"{len(rows) - failed} ok, {failed} failing")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
