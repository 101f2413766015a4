"""Narrow unit tests of the app's pure parts: the args contract, token budgeting, frames, error
mapping. The behaviour users see is tested against the real engine in the other modules."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "files"))
import vllm_app  # noqa: E402

ARGS = {"model": {"id": "org/model"}}


class TestArgsContract:
    def test_should_fill_defaults_and_treat_empty_strings_as_unset(self):
        args = vllm_app.AppArgs.model_validate({"model": {"id": "org/model", "servedName": "", "revision": "",
                                                          "chatTemplate": ""}, "serving": {"apiKeyEnv": ""}})
        assert args.model.name == "org/model"
        assert args.model.revision is None and args.model.chat_template is None
        assert args.serving.api_key_env is None
        assert args.engine.tensor_parallel_size == 1

    @pytest.mark.parametrize("args, problem", [
        ({}, "model"),
        ({"model": {"id": "x", "servedname": "y"}}, "servedname"),
        ({"model": {"id": "x"}, "engine": {"dtype": "fp4"}}, "engine.dtype"),
        ({"model": {"id": "x"}, "engine": {"tensorParallelSize": 0}}, "engine.tensorParallelSize"),
        ({"model": {"id": "x"}, "engine": {"gpuMemoryUtilization": 2}}, "engine.gpuMemoryUtilization"),
    ])
    def test_build_app_should_name_a_bad_arg(self, args, problem):
        with pytest.raises(ValueError, match="Invalid vllm_app args") as failure:
            vllm_app.build_app(args)
        assert problem in str(failure.value)

    def test_build_app_should_reject_an_unknown_vllm_engine_argument(self):
        with pytest.raises(ValueError, match="max_num_seq"):
            vllm_app.build_app({"model": {"id": "x"}, "engine": {"extraArgs": {"max_num_seq": 8}}})

    def test_engine_kwargs_should_map_the_contract_to_vllm_names(self):
        args = vllm_app.AppArgs.model_validate({
            "model": {"id": "org/model", "servedName": "chat", "revision": "v1", "trustRemoteCode": True},
            "engine": {"dtype": "float16", "maxModelLen": 4096, "gpuMemoryUtilization": 0.8, "tensorParallelSize": 2,
                       "enforceEager": True, "extraArgs": {"max_num_seqs": 8}}})
        kwargs = vllm_app.vllm_engine_kwargs(args)
        assert kwargs == {"model": "org/model", "served_model_name": ["chat"], "revision": "v1",
                          "trust_remote_code": True, "dtype": "float16", "max_model_len": 4096,
                          "gpu_memory_utilization": 0.8, "tensor_parallel_size": 2, "pipeline_parallel_size": 1,
                          "enforce_eager": True, "distributed_executor_backend": "mp", "max_num_seqs": 8}
        from vllm import AsyncEngineArgs

        AsyncEngineArgs(**kwargs)  # every name is one vLLM knows

    def test_api_key_env_that_is_empty_should_refuse_to_start(self, monkeypatch):
        monkeypatch.delenv("SOME_KEY_ENV", raising=False)
        with pytest.raises(RuntimeError, match="SOME_KEY_ENV"):
            vllm_app._api_key(vllm_app.ServingArgs(api_key_env="SOME_KEY_ENV"))

    def test_current_code_should_start_at_once(self, monkeypatch):
        import hashlib

        monkeypatch.setenv(vllm_app.CODE_HASH_ENV, hashlib.sha256(Path(vllm_app.__file__).read_bytes()).hexdigest())
        assert vllm_app._wait_for_current_code() is True
        monkeypatch.delenv(vllm_app.CODE_HASH_ENV)
        assert vllm_app._wait_for_current_code() is True  # outside a Serve config: nothing to check

    def test_stale_code_should_wait_for_the_configmap_update(self, monkeypatch, tmp_path):
        import hashlib
        import threading

        app_file = tmp_path / "vllm_app.py"
        app_file.write_text("old")
        monkeypatch.setenv(vllm_app.CODE_HASH_ENV, hashlib.sha256(b"new").hexdigest())
        threading.Timer(0.3, app_file.write_text, args=("new",)).start()  # the kubelet's update
        assert vllm_app._wait_for_current_code(app_file, timeout_s=10, poll_s=0.05) is False

    def test_code_that_never_arrives_should_fail_clearly(self, monkeypatch, tmp_path):
        app_file = tmp_path / "vllm_app.py"
        app_file.write_text("old")
        monkeypatch.setenv(vllm_app.CODE_HASH_ENV, "0" * 64)
        with pytest.raises(RuntimeError, match="ConfigMap has not reached this pod"):
            vllm_app._wait_for_current_code(app_file, timeout_s=0.2, poll_s=0.05)


class TestTokenBudget:
    def test_should_default_to_what_the_context_leaves(self):
        assert vllm_app._fit_max_tokens(100, None, 512, "max_tokens", "prompt") == 412

    def test_should_keep_what_fits(self):
        assert vllm_app._fit_max_tokens(100, 412, 512, "max_tokens", "prompt") == 412

    def test_should_refuse_what_does_not_fit(self):
        with pytest.raises(vllm_app.OpenAIError) as failure:
            vllm_app._fit_max_tokens(100, 413, 512, "max_tokens", "prompt")
        assert (failure.value.status, failure.value.param) == (400, "max_tokens")

    def test_should_refuse_a_prompt_that_fills_the_context(self):
        with pytest.raises(vllm_app.OpenAIError) as failure:
            vllm_app._fit_max_tokens(512, None, 512, "max_tokens", "messages")
        assert (failure.value.param, failure.value.code) == ("messages", "context_length_exceeded")


def _output(index, text, tokens, finish=None):
    return SimpleNamespace(index=index, text=text, token_ids=list(range(tokens)), finish_reason=finish)


def _frames(raw):
    return [json.loads(frame[len(b"data: "):]) for frame in raw]


class TestFrames:
    def test_chat_stream_should_open_with_the_role_and_count_tokens(self):
        completion = vllm_app.Completion("chat", "m", 1, prompt_tokens=5)
        [role] = _frames(completion.role_frames())
        assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        [delta] = _frames(completion.delta_frames([_output(0, "Hi", 2)]))
        assert delta["choices"][0]["delta"] == {"content": "Hi"}
        [last] = _frames(completion.delta_frames([_output(0, "", 1, "length")]))
        assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
        [usage] = _frames([completion.usage_frame()])
        assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                                             "total_tokens": 8}

    def test_text_stream_should_carry_text_and_no_role(self):
        completion = vllm_app.Completion("text", "m", 1, prompt_tokens=1)
        assert completion.role_frames() == []
        [frame] = _frames(completion.delta_frames([_output(0, "abc", 1)]))
        assert frame["object"] == "text_completion" and frame["choices"][0]["text"] == "abc"

    def test_response_should_sum_usage_over_choices(self):
        completion = vllm_app.Completion("chat", "m", 2, prompt_tokens=4)
        answer = completion.response([_output(1, "b", 3, "stop"), _output(0, "a", 2, "length")])
        assert [choice["index"] for choice in answer["choices"]] == [0, 1]
        assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}

    def test_sse_frames_should_be_single_lines(self):
        frame = vllm_app._sse({"text": "line one\nline two"})
        assert frame.endswith(b"\n\n") and frame.count(b"\n") == 2


class TestErrorMapping:
    def test_client_mistakes_found_by_the_engine_should_be_400(self):
        assert vllm_app._from_engine_error(ValueError("bad stop")).status == 400

    def test_a_dead_engine_should_be_503(self):
        EngineDeadError = type("EngineDeadError", (Exception,), {})
        assert vllm_app._from_engine_error(EngineDeadError()).status == 503

    def test_anything_else_should_be_500_without_details(self):
        error = vllm_app._from_engine_error(KeyError("internal detail"))
        assert error.status == 500 and "internal detail" not in error.message


class TestChatTemplate:
    """render_chat with the real tokenizer of the tiny model (no engine needed)."""

    @staticmethod
    def _engine(model_dir, template=None):
        from transformers import AutoTokenizer

        args = vllm_app.AppArgs.model_validate({"model": {"id": str(model_dir), "chatTemplate": template or ""}})
        engine = vllm_app.VLLMEngine(args)
        engine.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return engine

    def test_should_use_the_tokenizers_own_template(self, tiny_model_dir):
        engine = self._engine(tiny_model_dir)
        text = engine.tokenizer.decode(engine.render_chat([{"role": "user", "content": "hello"}]))
        assert text == "<|user|>\nhello</s>\n<|assistant|>\n"

    def test_an_override_template_should_replace_it(self, tiny_model_dir):
        engine = self._engine(tiny_model_dir, "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}")
        assert engine.chat_template_available()
        text = engine.tokenizer.decode(engine.render_chat([{"role": "user", "content": "hello"}]))
        assert text == "[user] hello "

    def test_a_tokenizer_without_a_template_should_say_so(self, no_template_model_dir):
        assert not self._engine(no_template_model_dir).chat_template_available()
        assert self._engine(no_template_model_dir, "{{ messages }}").chat_template_available()
