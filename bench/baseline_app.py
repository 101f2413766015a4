"""BASELINE ONLY, never shipped in the chart: the original guide's design, kept to measure against.

A Ray Serve deployment that calls vLLM's blocking `LLM.generate` inside its async handler, as the
guide this project started from does. While one request generates, the replica's event loop is
blocked, so requests run one at a time. To take the benchmark's workload it speaks just enough of
the OpenAI chat API: it renders the chat template (the guide hard-coded TinyLlama's format), and
answers a streaming request with the whole completion in one frame, since a blocking call has
nothing to stream before it returns. Everything else is as in the guide, fake id included.
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

api = FastAPI()


@serve.deployment(name="OriginalDesign")
@serve.ingress(api)
class OriginalDesign:
    def __init__(self, model: str, engine: dict):
        from vllm import LLM

        self.llm = LLM(model=model, **engine)
        self.tokenizer = self.llm.get_tokenizer()

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        from vllm import SamplingParams

        body = await request.json()
        prompt = self.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        params = SamplingParams(max_tokens=body.get("max_tokens", 256), temperature=body.get("temperature", 1.0),
                                ignore_eos=body.get("ignore_eos", False))
        output = self.llm.generate([prompt], params)[0]  # blocks the event loop: the design under test
        text, tokens = output.outputs[0].text, len(output.outputs[0].token_ids)
        usage = {"prompt_tokens": len(output.prompt_token_ids), "completion_tokens": tokens,
                 "total_tokens": len(output.prompt_token_ids) + tokens}
        if not body.get("stream"):
            return JSONResponse({"id": "chatcmpl-123", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "length"}], "usage": usage})

        def frames():
            chunk = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "finish_reason": "length"}]}
            import json

            yield f"data: {json.dumps(chunk)}\n\n"
            yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")


def build_app(args: dict):
    return OriginalDesign.bind(args["model"], args["engine"])
