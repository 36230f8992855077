"""Text in and out: streaming equals one-shot decoding (emoji and CJK never come out as U+FFFD), stop strings
never leak, and chat templates render exactly as transformers renders them."""

from __future__ import annotations

import edgeroute as er
import pytest
from edgeroute.tokenizer import Tokenizer
from tiny_model import build_tokenizer

TEXTS = ["Hello world!", "日本語のテキスト", "🤖🎨 robots paint", "El niño läuft 🤖 日本", "a\u200db 🇫🇷 👩‍👩‍👧"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(build_tokenizer())


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_one_shot_and_never_emits_replacement(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) > 1
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    if any(ord(c) > 127 for c in text):
        assert "" in pieces  # at least one multi-byte character was split across tokens and held back


def test_generated_stream_equals_decode(tiny: er.Model) -> None:
    for seed in range(40):
        cfg = er.GenerationConfig(max_new_tokens=12, sampling=er.SamplingConfig(temperature=1.5, seed=seed))
        gen = tiny.generator(cfg)
        gen.append(tiny.tokenizer.encode("日本語 🤖"))
        steps = list(gen)
        ids = [s.token_id for s in steps if s.token_id not in tiny.manifest.eos_token_ids]
        text, full = "".join(s.text for s in steps), tiny.tokenizer.decode(ids)
        # the same text, but for an incomplete character at a length cut-off, which decode renders as U+FFFD
        # and the stream leaves out
        assert full.startswith(text) and set(full[len(text) :]) <= {"\ufffd"} and not text.endswith("\ufffd")
        assert tiny.generate(tiny.tokenizer.encode("日本語 🤖"), cfg).text == text


def test_stop_string_split_inside_a_multibyte_character_never_leaks(tiny: er.Model) -> None:
    # Force the output to be the tokens of "ab🤖cd" through logit biases, one token per step.
    target = tiny.tokenizer.encode("ab🤖cd🎨")
    gen = tiny.generator(
        er.GenerationConfig(max_new_tokens=len(target), stop=("🤖c",), sampling=er.SamplingConfig(temperature=0))
    )
    gen.append(tiny.tokenizer.encode("x"))
    out = []
    for t in target:  # bias each step towards the next target token, via a fresh router each step
        gen._seq.chooser.router = er.make_chain(
            er.SamplingConfig(temperature=0, logit_bias={t: 100.0}), tiny.vocab_size
        )
        st = gen.step()
        assert st.token_id == t
        out.append(st)
        if st.finish_reason:
            break
    assert "".join(s.text for s in out) == "ab"
    assert out[-1].finish_reason == "stop"
    assert all("\ufffd" not in s.text for s in out)


def test_chat_template_renders(tok: Tokenizer) -> None:
    from tiny_model import CHATML

    t = Tokenizer(tok.backend, CHATML, {"eos_token": "<|endoftext|>"})
    text = t.render_chat([{"role": "user", "content": "Hi"}])
    assert (
        text == "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert ids[0] == t.token_to_id("<|im_start|>") and t.decode(ids, skip_special_tokens=False) == text
    with pytest.raises(er.ConfigError):
        Tokenizer(tok.backend).render_chat([{"role": "user", "content": "Hi"}])
    with pytest.raises(er.ConfigError):
        t.render_chat("not messages")  # type: ignore[arg-type]


SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Hi 🤖"},
        {"role": "assistant", "content": "Hello! 日本"},
        {"role": "user", "content": "  Paint me a robot.  "},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "unit": "°C"}}}
            ],
        },
        {"role": "tool", "content": "21 °C"},
        {"role": "user", "content": "Thanks"},
    ],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Météo",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3, QWEN2, MISTRAL], ids=["smollm2", "llama3", "qwen2", "mistral"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no_tools", "tools"])
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_templates_match_transformers(tok: Tokenizer, template: str, conv: int, tools, gen_prompt) -> None:
    transformers = pytest.importorskip("transformers")
    import jinja2

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.backend, **SPECIALS)
    hf.chat_template = template
    ours = Tokenizer(tok.backend, template, hf.special_tokens_map)
    messages = CONVERSATIONS[conv]
    try:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt, tools=tools)
    except jinja2.exceptions.TemplateError as e:  # the template refuses: we must refuse the same way
        assert template is MISTRAL and conv > 0
        with pytest.raises(er.ConfigError, match=str(e).replace(".", "\\.")):
            ours.render_chat(messages, tools=tools)
        return
    assert ours.render_chat(messages, add_generation_prompt=gen_prompt, tools=tools) == want
    want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen_prompt, tools=tools)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tools=tools) == list(want_ids)
