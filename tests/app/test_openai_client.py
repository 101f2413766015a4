"""The app as OpenAI clients see it: the official `openai` SDK against the real engine.

Every request whose generated text is looked at decodes greedily (temperature 0) or with a seed."""

import asyncio

import pytest

pytestmark = pytest.mark.engine

HELLO = [{"role": "user", "content": "Hello, how are you?"}]


class TestModels:
    def test_should_list_the_served_model(self, client, model_name):
        models = client.models.list()
        assert [model.id for model in models.data] == [model_name]
        assert models.data[0].object == "model"


class TestChatCompletions:
    def test_should_answer_with_an_assistant_message_and_real_usage(self, client, model_name):
        answer = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=8, temperature=0,
                                                extra_body={"ignore_eos": True})
        assert answer.id.startswith("chatcmpl-")
        assert answer.object == "chat.completion"
        assert answer.model == model_name
        assert answer.created > 1_700_000_000
        [choice] = answer.choices
        assert choice.message.role == "assistant"
        assert choice.message.content
        assert choice.finish_reason in ("stop", "length")
        assert answer.usage.prompt_tokens > 0
        assert 0 < answer.usage.completion_tokens <= 8
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

    def test_should_stop_with_length_at_max_tokens(self, client, model_name):
        answer = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=5,
                                                extra_body={"ignore_eos": True})
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 5

    def test_max_completion_tokens_should_win_over_max_tokens(self, client, model_name):
        answer = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=20,
                                                max_completion_tokens=3, extra_body={"ignore_eos": True})
        assert answer.usage.completion_tokens == 3

    def test_greedy_output_should_be_deterministic(self, client, model_name):
        answers = {client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=16,
                                                  temperature=0).choices[0].message.content for _ in range(3)}
        assert len(answers) == 1

    def test_a_seed_should_make_sampling_repeatable(self, client, model_name):
        def sample(seed):
            return client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=16,
                                                  temperature=1.0, seed=seed).choices[0].message.content
        assert sample(7) == sample(7)

    def test_should_honour_a_stop_sequence(self, client, model_name):
        full = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=24, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].message.content
        # Stop at a piece of what greedy decoding produces anyway: it must end just before it.
        stop = full[len(full) // 2:len(full) // 2 + 3]
        assert stop.strip(), full
        answer = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=24, temperature=0,
                                                stop=[stop], extra_body={"ignore_eos": True})
        assert answer.choices[0].finish_reason == "stop"
        assert stop not in answer.choices[0].message.content
        assert full.startswith(answer.choices[0].message.content)

    def test_should_return_n_choices(self, client, model_name):
        answer = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=4, n=3,
                                                extra_body={"ignore_eos": True})
        assert sorted(choice.index for choice in answer.choices) == [0, 1, 2]
        assert answer.usage.completion_tokens == 12

    def test_ids_should_be_unique(self, client, model_name):
        ids = {client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=1).id for _ in range(5)}
        assert len(ids) == 5

    def test_should_accept_system_messages_text_parts_and_unknown_fields(self, client, model_name):
        answer = client.chat.completions.create(
            model=model_name, max_tokens=4, user="someone", presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9,
            messages=[{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}],
            extra_body={"some_future_openai_field": {"x": 1}},
        )
        assert answer.choices[0].message.role == "assistant"


class TestChatStreaming:
    def test_should_stream_role_then_deltas_then_finish(self, client, model_name):
        stream = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=10, stream=True,
                                                temperature=0, extra_body={"ignore_eos": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
        assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text
        assert chunks[-1].choices[0].finish_reason == "length"

    def test_streamed_text_should_equal_the_non_streamed_text(self, client, model_name):
        kwargs = dict(model=model_name, messages=HELLO, max_tokens=20, temperature=0)
        whole = client.chat.completions.create(**kwargs).choices[0].message.content
        streamed = "".join(chunk.choices[0].delta.content or ""
                           for chunk in client.chat.completions.create(stream=True, **kwargs) if chunk.choices)
        assert streamed == whole

    def test_should_send_a_usage_chunk_when_asked(self, client, model_name):
        chunks = list(client.chat.completions.create(
            model=model_name, messages=HELLO, max_tokens=6, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}))
        usage_chunk = chunks[-1]
        assert usage_chunk.choices == []
        assert usage_chunk.usage.completion_tokens == 6
        assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 6
        assert all(chunk.usage is None for chunk in chunks[:-1])

    def test_should_end_the_raw_stream_with_done(self, http, model_name):
        with http.stream("POST", "/v1/chat/completions", json={
                "model": model_name, "messages": HELLO, "max_tokens": 4, "stream": True}) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert all(line.startswith("data: ") for line in lines)
        assert lines[-1] == "data: [DONE]"


class TestCompletions:
    def test_should_complete_a_prompt(self, client, model_name):
        answer = client.completions.create(model=model_name, prompt="The river", max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.id.startswith("cmpl-")
        assert answer.object == "text_completion"
        assert answer.choices[0].text
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == 6

    def test_should_complete_a_list_of_prompts(self, client, model_name):
        answer = client.completions.create(model=model_name, prompt=["one", "two three"], max_tokens=3,
                                           extra_body={"ignore_eos": True})
        assert [choice.index for choice in answer.choices] == [0, 1]
        assert answer.usage.completion_tokens == 6

    def test_should_stream_a_completion(self, client, model_name):
        chunks = list(client.completions.create(model=model_name, prompt="The river", max_tokens=6, stream=True,
                                                stream_options={"include_usage": True}, temperature=0,
                                                extra_body={"ignore_eos": True}))
        assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
        assert chunks[-1].usage.completion_tokens == 6


class TestWhatTheOldAppSilentlyIgnored:
    """The requests agent frameworks send, answered as asked (the table in issue 8)."""

    def test_json_schema_output_should_validate(self, client, model_name):
        import json

        import jsonschema

        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                  "additionalProperties": False}
        answer = client.chat.completions.create(
            model=model_name, messages=HELLO, max_tokens=40, temperature=1.0, seed=5,
            response_format={"type": "json_schema", "json_schema": {"name": "status", "schema": schema}})
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)

    def test_a_named_tool_should_be_called_with_valid_arguments(self, client, model_name):
        import json

        parameters = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}},
                      "required": ["city"], "additionalProperties": False}
        answer = client.chat.completions.create(
            model=model_name, messages=HELLO, max_tokens=60, temperature=1.0, seed=11,
            tools=[{"type": "function", "function": {"name": "where", "parameters": parameters}}],
            tool_choice={"type": "function", "function": {"name": "where"}})
        [call] = answer.choices[0].message.tool_calls
        assert call.function.name == "where"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")

    def test_logprobs_should_come_back(self, client, model_name):
        answer = client.chat.completions.create(model=model_name, messages=HELLO, max_tokens=3, temperature=0,
                                                logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
        tokens = answer.choices[0].logprobs.content
        assert len(tokens) == 3 and all(len(token.top_logprobs) == 2 for token in tokens)

    def test_the_responses_api_should_answer(self, client, model_name):
        response = client.responses.create(model=model_name, input="Hello", max_output_tokens=8, temperature=0)
        assert response.status in ("completed", "incomplete") and response.output_text is not None


class TestConcurrency:
    def test_sixteen_concurrent_streams_should_all_succeed(self, async_client, model_name):
        async def one(index):
            stream = await async_client.chat.completions.create(
                model=model_name, messages=[{"role": "user", "content": f"Request {index}"}], max_tokens=32,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            chunks = [chunk async for chunk in stream]
            return chunks[-1].usage.completion_tokens

        async def all_of_them():
            async with async_client:
                return await asyncio.gather(*(one(i) for i in range(16)))

        assert asyncio.run(all_of_them()) == [32] * 16


class TestEmbeddingModel:
    """The same app serving an embedding model: vLLM mounts its pooling routes, and only those."""

    def test_embeddings_should_come_back_for_each_input(self, server, model_name):
        import httpx

        from tests.app.conftest import API_KEY, EMBED_ROUTE

        response = httpx.post(server.url + EMBED_ROUTE + "/v1/embeddings", timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"model": model_name, "input": ["The river", "The mountain city"]})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [item["index"] for item in data] == [0, 1]
        assert len(data[0]["embedding"]) == 64  # the tiny model's hidden size
        assert data[0]["embedding"] != data[1]["embedding"]

    def test_an_embedding_model_should_not_chat_and_say_so_in_openai_shape(self, server, model_name):
        import httpx

        from tests.app.conftest import API_KEY, EMBED_ROUTE

        response = httpx.post(server.url + EMBED_ROUTE + "/v1/chat/completions", timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"model": model_name, "messages": HELLO})
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        unauthorized = httpx.post(server.url + EMBED_ROUTE + "/v1/embeddings", timeout=60,
                                  json={"model": model_name, "input": "x"})
        assert unauthorized.status_code == 401
