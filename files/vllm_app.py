"""An OpenAI-compatible Ray Serve app: vLLM's own OpenAI server, inside one Serve deployment.

The chart ships this file in a ConfigMap; the RayService runs it as `vllm_app:build_app` with the
`args` rendered from values (README, "The app contract"). The OpenAI protocol (chat, completions,
tools, structured output, logprobs, /tokenize, /v1/responses, ...) is vLLM's frontend, built the way
`vllm serve` builds it. This file adds only what vLLM's server does not do inside a cluster. Read
top to bottom:

  1. the args contract (AppArgs)          4. the gate: routes, API key, request id, log line
  2. vLLM's frontend (the only section    5. the code-hash wait and the engine watchdog
     that touches vLLM's internals)       6. the deployment
  3. usage accounting                     7. build_app

Quotas and priorities per API key are vllm_app_quotas.py's; the gate (section 4) calls it.

vLLM is imported only inside section 2's functions, so building the app on the Serve controller
and the unit tests of the contract do not need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel
from ray import serve

import vllm_app_routing
import vllm_app_quotas

logger = logging.getLogger("ray.serve")

# The serveConfigV2 env var holding the sha256 of this file, set by the chart (see section 5).
CODE_HASH_ENV = "VLLM_APP_SHA256"
# How every error that stops the app from starting begins, in the log and in Serve's status.
START_FAILED = "vllm_app cannot start:"


# ---------------------------------------------------------------------------------------------
# 1. The args contract: what serveConfigV2 `args` may hold. Keys are the chart's values names.
# ---------------------------------------------------------------------------------------------


class _Args(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


def _empty_is_unset(cls, value):
    """The chart renders unset strings as "": they mean "not set"."""
    return value or None


class ModelArgs(_Args):
    id: str = Field(min_length=1)
    served_name: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    chat_template: Optional[str] = None

    empty_is_unset = field_validator("served_name", "revision", "chat_template", mode="before")(_empty_is_unset)

    @property
    def name(self) -> str:
        return self.served_name or self.id


class EngineArgs(_Args):
    dtype: Literal["auto", "float16", "bfloat16", "float32", "half", "float"] = "auto"
    max_model_len: Optional[int] = Field(default=None, ge=16)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool = False
    stream_interval: int = Field(default=1, ge=1)
    # vLLM engine arguments by their Python names (AsyncEngineArgs fields), checked in build_app.
    extra_args: dict[str, Any] = Field(default_factory=dict)


class OpenAIArgs(_Args):
    """vLLM's OpenAI frontend settings (what `vllm serve` takes beside the engine arguments)."""
    tool_call_parser: Optional[str] = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: Optional[str] = None
    chat_template_content_format: Literal["auto", "string", "openai"] = "auto"
    # vLLM frontend arguments by their Python names (FrontendArgs fields), checked in build_app.
    extra_args: dict[str, Any] = Field(default_factory=dict)

    empty_is_unset = field_validator("tool_call_parser", "reasoning_parser", mode="before")(_empty_is_unset)

    @model_validator(mode="after")
    def _auto_tool_choice_needs_a_parser(self):
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("enableAutoToolChoice needs toolCallParser (the parser that reads the "
                             "model's tool calls, e.g. hermes)")
        return self


class ServingArgs(_Args):
    # Name of the environment variable holding the single API key (its name is "default").
    api_key_env: Optional[str] = None
    # A folder with one file per named key (a mounted Secret: file name = key name), re-read
    # while the app runs. With neither set: no auth.
    api_keys_dir: Optional[str] = None
    log_prompts: bool = False
    # A generation at replica start, before the replica takes traffic (section 6).
    warmup: bool = True
    # The watchdog's threshold: seconds without an engine step while requests wait (section 6).
    engine_stall_seconds: float = Field(default=60, gt=0)
    # Which replica takes a request: HAProxy's leastconn, or by session / prefix (vllm_app_routing.py).
    routing: vllm_app_routing.RoutingArgs = Field(default_factory=vllm_app_routing.RoutingArgs)
    # The key policies (quotas, priorities; vllm_app_quotas.py), a file re-read while the app runs.
    key_policies_file: Optional[str] = None
    # vLLM's priority scheduling, for the policies' priorities; the chart turns it on when one is set.
    priority_scheduling: bool = False

    empty_is_unset = field_validator("api_key_env", "api_keys_dir", "key_policies_file",
                                     mode="before")(_empty_is_unset)


# An adapter's name is the `model` clients send, and with loadOnFirstUse also a folder name in the
# adapters volume: letters, digits and . _ : -, so that no name can reach outside that folder.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
# The values vLLM 0.29 accepts for max_lora_rank (vllm.config.lora.MaxLoRARanks).
LORA_RANKS = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


class LoraAdapter(_Args):
    name: str = Field(pattern=ADAPTER_NAME)
    # A folder in the pods with PEFT's adapter_config.json and adapter weights. The chart makes
    # paths relative to the adapters volume absolute.
    path: str = Field(min_length=1)


class LoraArgs(_Args):
    """LoRA adapters on top of the model: vLLM's --enable-lora and --lora-modules, and for
    loadOnFirstUse vLLM's filesystem resolver on `folder` (README, "LoRA adapters")."""
    enabled: bool = False
    max_loras: int = Field(default=1, ge=1)
    max_lora_rank: LORA_RANKS = 16
    max_cpu_loras: Optional[int] = Field(default=None, ge=1)
    adapters: list[LoraAdapter] = Field(default_factory=list)
    load_on_first_use: bool = False
    # The adapters volume, where loadOnFirstUse looks for `<folder>/<name>/`.
    folder: Optional[str] = None

    empty_is_unset = field_validator("folder", mode="before")(_empty_is_unset)

    @model_validator(mode="after")
    def _consistent(self):
        if (self.adapters or self.load_on_first_use) and not self.enabled:
            raise ValueError("adapters and loadOnFirstUse need enabled: true")
        names = [adapter.name for adapter in self.adapters]
        if duplicates := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"adapter names must be unique: {duplicates} appear more than once")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"maxCpuLoras ({self.max_cpu_loras}) must be at least maxLoras ({self.max_loras})")
        if self.load_on_first_use and not self.folder:
            raise ValueError("loadOnFirstUse needs folder, where the adapters are")
        return self


class AppArgs(_Args):
    model: ModelArgs
    engine: EngineArgs = Field(default_factory=EngineArgs)
    openai: OpenAIArgs = Field(default_factory=OpenAIArgs)
    serving: ServingArgs = Field(default_factory=ServingArgs)
    lora: LoraArgs = Field(default_factory=LoraArgs)

    @model_validator(mode="after")
    def _adapters_are_not_the_model(self):
        if any(adapter.name == self.model.name for adapter in self.lora.adapters):
            raise ValueError(f"lora.adapters: an adapter is named {self.model.name!r}, the served model's "
                             "name; clients could not tell them apart")
        return self


# vLLM imports this in each worker process (a worker_extension_cls); its import is the set-up.
WORKER_SETUP = "vllm_app_worker.WorkerSetup"

# Frontend arguments the app decides itself: setting them would bypass what section 4 guarantees.
OWNED_FRONTEND_ARGS = {
    "api_key": "set the chart value serving.apiKey instead",
    "enable_request_id_headers": "the app always answers with X-Request-Id",
    "disable_fastapi_docs": "the app serves no documentation routes",
}


def vllm_engine_settings(args: AppArgs) -> dict:
    """vLLM's engine arguments (AsyncEngineArgs fields) from the contract."""
    engine = args.engine
    settings = {
        "model": args.model.id,
        "served_model_name": [args.model.name],
        "revision": args.model.revision,
        "trust_remote_code": args.model.trust_remote_code,
        "dtype": engine.dtype,
        "max_model_len": engine.max_model_len,
        "gpu_memory_utilization": engine.gpu_memory_utilization,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "pipeline_parallel_size": engine.pipeline_parallel_size,
        "enforce_eager": engine.enforce_eager,
        "stream_interval": engine.stream_interval,
        "reasoning_parser": args.openai.reasoning_parser or "",
        # Set-up inside each of vLLM's worker processes (vllm_app_worker.py: AMX tiles on Intel CPUs).
        "worker_extension_cls": WORKER_SETUP,
    }
    if engine.tensor_parallel_size * engine.pipeline_parallel_size > 1:
        # The replica actor holds all of its GPUs on one pod (the chart enforces it), so vLLM's
        # own worker processes share them; no Ray placement group is needed.
        settings["distributed_executor_backend"] = "mp"
    if args.serving.priority_scheduling:
        settings["scheduling_policy"] = "priority"
    if args.lora.enabled:
        settings.update(enable_lora=True, max_loras=args.lora.max_loras, max_lora_rank=args.lora.max_lora_rank,
                        max_cpu_loras=args.lora.max_cpu_loras)
    settings.update(engine.extra_args)
    return settings


def vllm_server_settings(args: AppArgs) -> dict:
    """What `vllm serve` would be given, by vLLM's Python names: engine and frontend arguments."""
    frontend = args.openai
    settings = {
        **vllm_engine_settings(args),
        "chat_template": args.model.chat_template,
        "tool_call_parser": frontend.tool_call_parser,
        "enable_auto_tool_choice": frontend.enable_auto_tool_choice,
        "chat_template_content_format": frontend.chat_template_content_format,
        # Engine statistics feed the metrics (section 2); the per-request line is section 4's.
        "disable_log_stats": False,
        "enable_log_requests": False,
        **frontend.extra_args,
    }
    if args.lora.adapters:
        # `--lora-modules '{"name": ..., "path": ...}'` on vLLM's command line: listed in /v1/models
        # with the served model as their parent.
        settings["lora_modules"] = [{"name": adapter.name, "path": adapter.path} for adapter in args.lora.adapters]
    settings.update(disable_fastapi_docs=True, enable_request_id_headers=False, api_key=None)
    return settings


# vLLM's entry-point plugin that registers its filesystem LoRA resolver.
LORA_RESOLVER_PLUGIN = "lora_filesystem_resolver"


def vllm_environment_settings(args: AppArgs, environ: Optional[dict] = None) -> dict:
    """vLLM settings that are environment variables, not arguments. loadOnFirstUse is vLLM's
    filesystem resolver: with runtime LoRA updating on, a request naming an adapter vLLM does not
    hold makes vLLM look for `<folder>/<name>/` and load it. Runtime updating also mounts vLLM's
    /v1/load_lora_adapter and /v1/unload_lora_adapter, which the gate (section 4) keeps closed."""
    lora = args.lora
    if not (lora.enabled and lora.load_on_first_use):
        return {}
    settings = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_LORA_RESOLVER_CACHE_DIR": lora.folder}
    plugins = (os.environ if environ is None else environ).get("VLLM_PLUGINS")
    if plugins is not None and LORA_RESOLVER_PLUGIN not in plugins.split(","):
        # VLLM_PLUGINS set in the pods (an allowlist) would leave the resolver out silently.
        settings["VLLM_PLUGINS"] = ",".join(filter(None, [plugins, LORA_RESOLVER_PLUGIN]))
    return settings


# ---------------------------------------------------------------------------------------------
# 2. vLLM's frontend. vLLM's serving classes are not a stable API, so every call into them is
#    here, and a vLLM whose shape differs fails at start with a message naming both versions.
# ---------------------------------------------------------------------------------------------

# The vLLM this file is tested against: the one Ray 2.60's ray[llm] pins (the default image's).
VLLM_VERSION_TESTED = "0.29.0"


@contextlib.contextmanager
def _log_buffers_kept():
    """Give back their targets to the logging MemoryHandlers that an import closed.

    vLLM configures its logging with logging.config.dictConfig when it is first imported, and
    dictConfig closes every handler in the process, not only its own. A closed MemoryHandler drops
    its target but goes on buffering: Serve's handler in front of the replica's log file then holds
    every record in memory and writes none (measured: the replica grew ~4.4 KiB per request, two log
    records each, and its Serve log file stopped after one line). A closed file handler reopens on
    its next record, so restoring the target is enough.
    """
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    targets = [(handler, handler.target) for logger in loggers for handler in logger.handlers
               if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None]
    try:
        yield
    finally:
        for handler, target in targets:
            if handler.target is None:
                handler.setTarget(target)


@functools.cache
def _vllm_internals():
    """vLLM's server-building pieces, or an error that names the installed and the tested vLLM."""
    with _log_buffers_kept():
        import vllm
        import vllm.logger  # noqa: F401  (configures vLLM's logging, see _log_buffers_kept)

    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app as build_vllm_app
        from vllm.entrypoints.launchers.cli_args import (
            FrontendArgs,
            make_arg_parser,
            validate_parsed_serve_args,
        )
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
        from vllm.lora.resolver import LoRAResolverRegistry
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger
    except (ImportError, AttributeError) as error:
        raise RuntimeError(
            f"vllm_app needs vLLM {VLLM_VERSION_TESTED}'s OpenAI server modules, but vLLM "
            f"{vllm.__version__} differs ({error}). Use an image with vLLM {VLLM_VERSION_TESTED} "
            "(README, \"Versions\").") from None
    if vllm.__version__ != VLLM_VERSION_TESTED:
        logger.warning("vLLM %s is installed; vllm_app is tested with vLLM %s.", vllm.__version__,
                       VLLM_VERSION_TESTED)
    return dict(AsyncEngineArgs=AsyncEngineArgs, init_app_state=init_app_state,
                build_vllm_app=build_vllm_app, FrontendArgs=FrontendArgs, make_arg_parser=make_arg_parser,
                validate_parsed_serve_args=validate_parsed_serve_args, UsageContext=UsageContext,
                FlexibleArgumentParser=FlexibleArgumentParser, AsyncLLM=AsyncLLM,
                RayPrometheusStatLogger=RayPrometheusStatLogger, StatLoggerBase=StatLoggerBase,
                LoadLoRAAdapterRequest=LoadLoRAAdapterRequest, LoRAResolverRegistry=LoRAResolverRegistry)


def check_vllm_argument_names(args: AppArgs) -> None:
    """Name a misspelt extraArgs key at deploy time (on the Serve controller, where vLLM is)."""
    import dataclasses

    vllm = _vllm_internals()
    checks = [("engine.extraArgs", args.engine.extra_args, vllm["AsyncEngineArgs"], "max_num_seqs"),
              ("openai.extraArgs", args.openai.extra_args, vllm["FrontendArgs"], "enable_prompt_tokens_details")]
    for key, given, fields_of, example in checks:
        known = {field.name for field in dataclasses.fields(fields_of)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"{key} has keys vLLM {VLLM_VERSION_TESTED} does not know: {unknown}. Use the "
                             f"Python names of vLLM's arguments (e.g. {example}).")
    for name, instead in OWNED_FRONTEND_ARGS.items():
        if name in args.openai.extra_args:
            raise ValueError(f"openai.extraArgs.{name} is set by the app itself: {instead}.")


def vllm_server_args(args: AppArgs, on_replica: bool = True):
    """The argparse Namespace `vllm serve` would build: vLLM's defaults, then our settings.

    build_app calls it on the Serve controller (on_replica=False) only to check the values: the
    adapters volume is mounted on the workers, not there, so vLLM's environment and its LoRA
    resolver are set up on the replica alone."""
    vllm = _vllm_internals()
    check_vllm_argument_names(args)
    # Before vLLM's parser: building it loads vLLM's plugins, which read their environment once.
    environment = vllm_environment_settings(args) if on_replica else {}
    if environment.get("VLLM_LORA_RESOLVER_CACHE_DIR") and not Path(args.lora.folder).is_dir():
        raise RuntimeError(f"lora.folder is {args.lora.folder}, but no folder is there; check that the "
                           "adapters volume (lora.volume) is mounted.")
    os.environ.update(environment)
    parser = vllm["make_arg_parser"](vllm["FlexibleArgumentParser"]())
    if environment:
        _hold_resolver_to_adapter_names(vllm["LoRAResolverRegistry"])
    namespace = parser.parse_args([])
    # Arguments that hold a config object (e.g. structured_outputs_config) take JSON on vLLM's
    # command line; a map from values goes through the same parser, so it is checked the same way.
    parse_json = {action.dest: action.type for action in parser._actions if callable(action.type)}
    option = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    for name, value in vllm_server_settings(args).items():
        if isinstance(value, dict) and name in parse_json:
            try:
                value = parse_json[name](json.dumps(value))
            except Exception as error:
                raise SettingError(f"{_chart_key(args, name)}: vLLM says: {_one_line(error)}") from error
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            # A list of objects (lora_modules) takes one JSON item each on the command line.
            value = getattr(parser.parse_args([option[name], *map(json.dumps, value)]), name)
        setattr(namespace, name, value)
    try:
        vllm["validate_parsed_serve_args"](namespace)
    except (TypeError, ValueError) as error:
        raise SettingError(f"vLLM rejects the engine/openai values: {_one_line(error)}") from error
    return namespace


class SettingError(ValueError):
    """A chart value vLLM refuses; its message names the value and gives vLLM's reason on one line."""


def _chart_key(args: AppArgs, name: str) -> str:
    """The chart value that set vLLM's argument `name`."""
    if name in args.engine.extra_args:
        return f"engine.extraArgs.{name}"
    if name in args.openai.extra_args:
        return f"openai.extraArgs.{name}"
    return f"the value behind vLLM's {name}"


def _one_line(error: BaseException) -> str:
    """An exception's message on one line, without pydantic's links to its docs."""
    lines = [line.strip() for line in str(error).splitlines()
             if line.strip() and not line.strip().startswith("For further information")]
    return " ".join(lines) or type(error).__name__


def model_path_problem(args: AppArgs) -> Optional[str]:
    """A model given as a local path that is not there (vLLM would take it for a hub id and say
    something about repo names)."""
    model = args.model.id
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().is_dir():
        return (f"model.id is {model}, but this pod has no folder there: check the model volume "
                "(modelCache / extraVolumes) or give a Hugging Face model id")
    return None


async def start_vllm_server(args: AppArgs, on_step=None):
    """vLLM's engine and its OpenAI FastAPI app over it, as `vllm serve` builds them.

    Returns (engine, app). The engine is created with the OpenAI-server usage context (on GPUs vLLM
    picks its server defaults, e.g. a larger max_num_seqs) and reports its statistics through
    Ray's metrics export, so they appear on every pod's Ray metrics port as `ray_vllm_*`.
    `on_step(requests)` is called at every engine step (the watchdog's heartbeat, see _engine_steps).
    """
    vllm = _vllm_internals()
    namespace = vllm_server_args(args)
    if namespace.worker_extension_cls != WORKER_SETUP:
        logger.warning("engine.extraArgs.worker_extension_cls replaces %s: on Intel CPUs with AMX, vLLM's CPU "
                       "workers may then die with SIGILL on a short first prompt (README, Troubleshooting)",
                       WORKER_SETUP)
    # from_cli_args also completes objects the namespace shares (e.g. the structured-output
    # config's reasoning parser), exactly as in `vllm serve`.
    engine_args = vllm["AsyncEngineArgs"].from_cli_args(namespace)
    usage_context = vllm["UsageContext"].OPENAI_API_SERVER
    config = engine_args.create_engine_config(usage_context=usage_context)
    engine_class = _metered(vllm["AsyncLLM"])
    stat_loggers = [vllm["RayPrometheusStatLogger"]]
    if on_step is not None:
        stat_loggers.append(_engine_steps(vllm["StatLoggerBase"], on_step))
    engine = engine_class.from_vllm_config(
        config, usage_context=usage_context, stat_loggers=stat_loggers,
        enable_log_requests=False, disable_log_stats=False)
    try:
        tasks = await engine.get_supported_tasks()
        app = vllm["build_vllm_app"](namespace, tasks, engine.model_config)
        adapters, namespace.lora_modules = namespace.lora_modules, None  # loaded below, one by one
        await vllm["init_app_state"](engine, app.state, namespace, tasks)
        await load_lora_adapters(app, adapters or [])
        # On a dead engine vLLM's error handler asks its uvicorn server to exit through
        # app.state.server; here Serve's health check replaces the replica instead, but the
        # attribute must exist or the handler fails with AttributeError in place of the error.
        app.state.server = _NoServer()
    except BaseException:
        engine.shutdown()
        raise
    logger.info("vLLM %s OpenAI server ready for %s; tasks: %s", VLLM_VERSION_TESTED, args.model.name, tasks)
    return engine, app


class _NoServer:
    should_exit = False


def _engine_steps(stat_logger_base, on_step):
    """A vLLM stat logger class whose only job is to call on_step(requests) at every engine step,
    with the requests the engine itself holds (running and waiting) after that step.

    vLLM's engine attaches its scheduler statistics to every step's output, a step that yields no
    token included (e.g. one chunk of a long prefill), and the frontend hands them to each stat
    logger as they arrive: one record() per engine iteration, in the replica's event loop.
    """

    class EngineSteps(stat_logger_base):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                on_step(scheduler_stats.num_running_reqs + scheduler_stats.num_waiting_reqs)

        def log_engine_initialized(self):
            pass

    return EngineSteps


async def warm_up(engine, tasks) -> float:
    """One short greedy generation through the engine, before the replica takes traffic. Returns
    its seconds.

    Lazy initialisation (kernels, allocator pools, the first batch's shapes) is then paid here,
    not by the first user; and a 2-token prompt is the shape that once killed vLLM's CPU worker
    on Intel AMX CPUs (vllm_app_worker.py), so an engine that cannot serve it fails its start, with
    a message, instead of answering 500 to its first user.
    """
    if "generate" not in tasks:
        return 0.0  # a pooling model: no generation to warm up
    from vllm import SamplingParams

    started = time.monotonic()
    params = SamplingParams(max_tokens=2, temperature=0.0)
    async for _ in engine.generate({"prompt_token_ids": [1, 2]}, params, f"warmup-{uuid.uuid4().hex}"):
        pass
    return time.monotonic() - started


def kill_engine_processes() -> list[int]:
    """SIGKILL vLLM's engine processes (every child of this replica process: the EngineCore and its
    workers). SIGKILL also ends a stopped process, which SIGTERM would not. Returns their pids."""
    import psutil

    killed = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
            killed.append(process.pid)
    return killed


# The name vLLM 0.29's filesystem resolver plugin registers under.
FILESYSTEM_RESOLVER = "Filesystem Resolver"


def _hold_resolver_to_adapter_names(registry) -> None:
    """Let vLLM's filesystem resolver look only for names values would accept (ADAPTER_NAME).

    It joins the requested `model` to its folder as it is: "../x" or "/x" would load an adapter from
    outside the adapters volume, and "a/." or "./a" would load the same adapter again under endless
    names, each one more entry in /v1/models and one more metrics label. Other names get vLLM's 404.
    """
    try:
        resolver = registry.get_resolver(FILESYSTEM_RESOLVER)
    except KeyError:
        raise RuntimeError(f"lora.loadOnFirstUse needs vLLM's {FILESYSTEM_RESOLVER!r}, which vLLM "
                           f"{VLLM_VERSION_TESTED} registers from its lora_filesystem_resolver plugin; it is "
                           "not registered (README, \"Versions\").") from None
    if getattr(resolver, "held_to_adapter_names", False):
        return
    resolve_lora = resolver.resolve_lora

    async def resolve_adapter_names_only(base_model_name: str, lora_name: str):
        if not re.fullmatch(ADAPTER_NAME, lora_name or ""):
            return None
        return await resolve_lora(base_model_name, lora_name)

    resolver.resolve_lora = resolve_adapter_names_only
    resolver.held_to_adapter_names = True


async def load_lora_adapters(app, adapters) -> dict[str, str]:
    """Load the adapters from values (lora_modules) through vLLM's own loader, one at a time.

    vLLM's server refuses to start when one listed adapter cannot be loaded (a missing folder, a
    rank above max_lora_rank, a corrupt file); here that adapter is left out, with an error in the
    log that names it and says why, and the replica serves the model and the other adapters. A
    request for it gets vLLM's 404, as for any model it does not serve. Returns {name: why}.
    """
    vllm = _vllm_internals()
    models = app.state.openai_serving_models
    left_out = {}
    for adapter in adapters:
        request = vllm["LoadLoRAAdapterRequest"](lora_name=adapter.name, lora_path=adapter.path,
                                                 is_3d_lora_weight=adapter.is_3d_lora_weight)
        result = await models.load_lora_adapter(request, base_model_name=adapter.base_model_name)
        if not isinstance(result, str):  # vLLM's ErrorResponse
            left_out[adapter.name] = result.error.message
            logger.error("LoRA adapter %r (%s) is not served: %s", adapter.name, adapter.path, result.error.message)
    return left_out


def lora_adapters_held(app) -> list[str]:
    """The adapters this replica's vLLM holds: from values, and those loaded on first use.

    The seam for adapter-affinity routing: a request router that prefers replicas already holding
    the requested adapter reads this per replica (e.g. through Serve's record_routing_stats)."""
    models = getattr(app.state, "openai_serving_models", None)
    return sorted(getattr(models, "lora_requests", None) or ())


# ---------------------------------------------------------------------------------------------
# 3. Usage accounting. vLLM's serving objects call the engine's generate() once per prompt; a
#    thin subclass counts the tokens into the HTTP request that caused them (a context variable,
#    which asyncio carries into the tasks the request spawns), for the log line and the per-key
#    counters.
# ---------------------------------------------------------------------------------------------

# The key label of requests that did not show a valid key (or were refused before the check), and
# of all requests when auth is off. A key's own name is never one of these: Secret keys are
# file names, which a Kubernetes Secret key cannot write with a leading "<".
UNAUTHENTICATED, ANONYMOUS = "<none>", "<anonymous>"
UNMATCHED = "<unmatched>"  # the route label of requests for no public route
# The model label of requests that generated nothing (errors, /v1/models, /tokenize, ...). A served
# request carries the name the engine served it under: the model's, or its LoRA adapter's, so a
# client's unknown `model` never becomes a label.
NO_MODEL = "<none>"


class RequestRecord:
    """What the log line says about one HTTP request."""

    def __init__(self, request_id: str, method: str, path: str):
        self.request_id, self.method, self.path = request_id, method, path
        self.started = time.monotonic()
        self.route = UNMATCHED  # the route's template, once matched
        self.key = UNAUTHENTICATED  # the name of the API key it came with, once checked
        self.model = NO_MODEL  # the model or LoRA adapter the engine served it with
        self.status = 0
        self.complete = False  # the last byte of the response went out
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.prompt_text: Optional[str] = None
        self.priority: Optional[int] = None  # the engine priority its key's policy gives it

    def count(self, output, delta: bool, first: bool) -> None:
        if first and output.prompt_token_ids is not None:
            self.prompt_tokens += len(output.prompt_token_ids)
        # DELTA outputs carry new tokens only; the others repeat everything, so count the last.
        if delta or output.finished:
            self.completion_tokens += sum(len(choice.token_ids) for choice in output.outputs)

    def line(self) -> str:
        latency_ms = (time.monotonic() - self.started) * 1000
        line = (f"request_id={self.request_id} method={self.method} route={self.path} key={self.key} "
                f"status={self.status} model={self.model} "
                f"prompt_tokens={self.prompt_tokens} completion_tokens={self.completion_tokens} "
                f"latency_ms={latency_ms:.0f}")
        if self.prompt_text is not None:
            line += f" prompt={self.prompt_text}"
        return line


class UsageMetrics:
    """Per-key counters on Ray's metrics export (`ray_vllm_rayservice_*` on each pod's metrics port),
    also by model, so that the usage of each LoRA adapter shows."""

    def __init__(self):
        from ray.util.metrics import Counter

        self.requests = Counter("vllm_rayservice_requests",
                                "HTTP requests by API key name, route, status and model or LoRA adapter.",
                                tag_keys=("key", "route", "status", "model"))
        self.prompt_tokens = Counter("vllm_rayservice_prompt_tokens",
                                     "Prompt tokens by API key name and model or LoRA adapter.",
                                     tag_keys=("key", "model"))
        self.completion_tokens = Counter("vllm_rayservice_completion_tokens",
                                         "Generated tokens by API key name and model or LoRA adapter.",
                                         tag_keys=("key", "model"))

    def record(self, record: "RequestRecord") -> None:
        tags = {"key": record.key, "model": record.model}
        self.requests.inc(1, {**tags, "route": record.route, "status": str(record.status)})
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens, tags)
        if record.completion_tokens:
            self.completion_tokens.inc(record.completion_tokens, tags)


_current_request: contextvars.ContextVar[Optional[RequestRecord]] = contextvars.ContextVar(
    "vllm_app_request", default=None)


def _metered(async_llm_class):
    """vLLM's AsyncLLM, counting each generation's tokens into the current request's record."""

    class MeteredAsyncLLM(async_llm_class):
        async def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
            record = _current_request.get()
            if record is not None:
                lora = kwargs.get("lora_request")
                record.model = lora.lora_name if lora is not None else self.model_config.served_model_name
                if record.priority is not None:
                    kwargs["priority"] = record.priority  # the key's, never the client's own
            delta = getattr(getattr(sampling_params, "output_kind", None), "name", "") == "DELTA"
            outputs = super().generate(prompt, sampling_params, request_id, *args, **kwargs)
            first = True
            try:
                async for output in outputs:
                    if record is not None:
                        record.count(output, delta, first)
                    first = False
                    yield output
            finally:
                # Close vLLM's generator now (it aborts the request if it did not finish), not
                # whenever the garbage collector gets to it.
                await outputs.aclose()

    return MeteredAsyncLLM


# ---------------------------------------------------------------------------------------------
# 4. The gate: the ASGI layer in front of vLLM's app. Only the public OpenAI routes pass (none of
#    vLLM's development, admin or SageMaker routes); every route but /health needs the API key
#    (vLLM's own key check covers /v1 paths only); every response carries X-Request-Id, which is
#    also vLLM's engine request id; one log line per request, with no prompt unless asked for.
# ---------------------------------------------------------------------------------------------

PUBLIC_ROUTES = {
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("POST", "/v1/responses/{response_id}/cancel"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/version"),
    # Pooling models (embeddings, scores, classification).
    ("POST", "/v1/embeddings"),
    ("POST", "/pooling"),
    ("POST", "/classify"),
    ("POST", "/score"),
    ("POST", "/v1/score"),
    ("POST", "/rerank"),
    ("POST", "/v1/rerank"),
    ("POST", "/v2/rerank"),
}
OPEN_PATHS = {"/health"}  # readable without the key: probes and load balancers


class Routes:
    """The public routes vLLM's app really mounts for this model (a generative model has no
    /v1/embeddings, an embedding model no /v1/chat/completions), matched by their templates."""

    def __init__(self, app):
        mounted = {(method, route.path) for route in getattr(app, "routes", [])
                   for method in getattr(route, "methods", None) or ()}
        # An app that lists no routes (a bare ASGI callable) is taken to serve them all.
        self.routes = PUBLIC_ROUTES & mounted if mounted else set(PUBLIC_ROUTES)
        self._patterns = [(method, template, re.compile(re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))))
                          for method, template in sorted(self.routes)]

    def template(self, method: str, path: str) -> str:
        """The route a request is for ("/v1/responses/{response_id}"), or UNMATCHED: metrics
        label routes by template, so a scanner's random paths add no series."""
        return next((template for m, template, pattern in self._patterns
                     if m == method and pattern.fullmatch(path)), UNMATCHED)

    def status(self, method: str, path: str) -> int:
        """200 for a public route, 405 for a public path with another method, else 404."""
        if self.template(method, path) != UNMATCHED:
            return 200
        return 405 if any(pattern.fullmatch(path) for _, _, pattern in self._patterns) else 404


def error_body(status: int, message: str, type: str, code: str) -> bytes:
    """OpenAI's nested error object, as vLLM's own errors are shaped."""
    return json.dumps({"error": {"message": message, "type": type, "param": None, "code": code}}).encode()


async def _answer(send, status: int, body: bytes, headers: tuple = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class APIKeys:
    """The keys that may call the API, by name. No keys: auth is off.

    The named keys come from a folder (a mounted Secret): the kubelet rewrites it when the Secret
    changes, and the folder is read again at most every `reload_s` seconds, so a key is added or
    revoked without restarting the model.
    """

    def __init__(self, fixed: dict[str, str], folder: Optional[str] = None, reload_s: float = 5.0):
        self._fixed = {name: key.encode() for name, key in fixed.items() if key}
        self._folder = Path(folder) if folder else None
        self._reload_s = reload_s
        self._read_at = float("-inf")
        self._keys = dict(self._fixed)
        self._reload()

    @property
    def enabled(self) -> bool:
        return bool(self._keys) or self._folder is not None

    def name_of(self, token: str) -> Optional[str]:
        """The name of the key sent, or None. Compares with every key in constant time."""
        self._reload()
        found = None
        for name, key in self._keys.items():
            if hmac.compare_digest(token.encode(), key):
                found = name
        return found

    def _reload(self) -> None:
        if self._folder is None or time.monotonic() - self._read_at < self._reload_s:
            return
        self._read_at = time.monotonic()
        keys = dict(self._fixed)
        try:
            # The kubelet keeps its own bookkeeping in dot-files (..data); the keys are the rest.
            for path in sorted(self._folder.iterdir()):
                if not path.name.startswith(".") and path.is_file():
                    key = path.read_text().strip()
                    if key:
                        keys[path.name] = key.encode()
        except OSError as error:
            # Keep the keys we had rather than locking everyone out (or letting everyone in).
            logger.warning("could not read the API keys in %s: %s; keeping the previous keys", self._folder, error)
            return
        self._keys = keys


def _bearer_token(headers: dict[bytes, bytes]) -> str:
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer":
        return token.strip()
    # Anthropic clients (/v1/messages) send the key in x-api-key.
    return headers.get(b"x-api-key", b"").decode("latin-1").strip()


MAX_LOGGED_PROMPT = 2000


class Gate:
    """ASGI middleware around vLLM's app; see the section comment."""

    def __init__(self, app, keys: APIKeys, log_prompts: bool, metrics: Optional[UsageMetrics] = None,
                 quotas: Optional[vllm_app_quotas.Quotas] = None):
        self.app, self.keys, self.log_prompts, self.metrics, self.quotas = app, keys, log_prompts, metrics, quotas
        self.routes = Routes(app)
        self.stats = {"requests": 0, "aborted": 0, "in_flight": 0}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan: vLLM's app starts its stats logging task
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        # Serve's ingress (proxy or HAProxy) gives every request an X-Request-Id, the client's or
        # a new one, and echoes it in the response. vLLM takes its engine request id from the
        # same header, so the log line, the engine and the client all name the request alike.
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")
        echo_id = not request_id  # no ingress in front set one (e.g. a bare ASGI test client)
        if echo_id:
            request_id = uuid.uuid4().hex
            scope = {**scope, "headers": [*scope["headers"], (b"x-request-id", request_id.encode())]}
        # Under a Serve route prefix the path still starts with it (ASGI's root_path convention).
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        record = RequestRecord(request_id, scope["method"], path)
        record.route = self.routes.template(scope["method"], path)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
                if echo_id:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record.complete = True
            await send(message)

        status = self.routes.status(scope["method"], path)
        if status != 200:
            text = "Not Found" if status == 404 else "Method Not Allowed"
            await _answer(send_with_id, status, error_body(
                status, f"{text}: {scope['method']} {path}", "invalid_request_error",
                "not_found" if status == 404 else "method_not_allowed"))
        elif path in OPEN_PATHS:
            return await self.app(scope, receive, send_with_id)  # not logged: probes poll it
        elif self.keys.enabled and (name := self.keys.name_of(_bearer_token(headers))) is None:
            await _answer(send_with_id, 401, error_body(
                401, "Missing or invalid API key. Send 'Authorization: Bearer <key>'.",
                "invalid_request_error", "invalid_api_key"))
        else:
            record.key = name if self.keys.enabled else ANONYMOUS
            if self.quotas is None:
                return await self._forward(scope, receive, send_with_id, record)
            return await self._forward_within_quota(scope, receive, send_with_id, record)
        self._finish(record)

    async def _forward_within_quota(self, scope, receive, send, record: RequestRecord) -> None:
        """The key's policy (vllm_app_quotas.py): a 429 over a limit, the x-ratelimit-* headers on
        every answer, the engine priority, and the tokens charged once the answer has ended."""
        admission = await self.quotas.admit(record.key, charged=scope["method"] == "POST")
        if admission.refused:
            await _answer(send, 429, error_body(429, admission.message, admission.refused, "rate_limit_exceeded"),
                          (*admission.headers, *admission.retry_headers()))
            return self._finish(record)
        record.priority = admission.priority

        async def send_with_limits(message):
            if message["type"] == "http.response.start" and admission.headers:
                message = {**message, "headers": [*message.get("headers", []), *admission.headers]}
            await send(message)

        try:
            await self._forward(scope, receive, send_with_limits, record)
        finally:
            admission.done(record.prompt_tokens + record.completion_tokens)

    async def _forward(self, scope, receive, send, record: RequestRecord) -> None:
        """Hand the request to vLLM's app, with its record as the current request."""
        if self.log_prompts:
            receive = self._capture_prompt(receive, record)
        token = _current_request.set(record)
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            if not record.complete:
                # The client went away before the answer ended: Serve cancelled the request, or
                # Starlette stopped the stream on the disconnect; either way vLLM aborted the
                # engine request.
                self.stats["aborted"] += 1
                record.status = 499
            self.stats["in_flight"] -= 1
            _current_request.reset(token)
            self._finish(record)

    @staticmethod
    def _capture_prompt(receive, record: RequestRecord):
        """Keep the request's messages or prompt for the log line (serving.logPrompts)."""
        body = bytearray()

        async def receive_and_keep():
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    try:
                        parsed = json.loads(body)
                        prompt = next((parsed[k] for k in ("messages", "prompt", "input") if k in parsed), None)
                    except (ValueError, TypeError):
                        prompt = None
                    if prompt is not None:
                        record.prompt_text = json.dumps(prompt)[:MAX_LOGGED_PROMPT]
            return message

        return receive_and_keep

    def _finish(self, record: RequestRecord) -> None:
        logger.info(record.line())
        if self.metrics is not None:
            self.metrics.record(record)


def _api_keys(serving: ServingArgs) -> APIKeys:
    fixed = {}
    if serving.api_key_env is not None:
        fixed["default"] = os.environ.get(serving.api_key_env, "")
        if not fixed["default"]:
            # Refuse to serve openly when the chart asked for auth but the key did not arrive.
            raise RuntimeError(f"serving.apiKeyEnv names {serving.api_key_env}, but that environment "
                               "variable is empty; check the API key Secret.")
    if serving.api_keys_dir is not None and not Path(serving.api_keys_dir).is_dir():
        raise RuntimeError(f"serving.apiKeysDir is {serving.api_keys_dir}, but no folder is there; check "
                           "that the named-keys Secret is mounted.")
    return APIKeys(fixed, serving.api_keys_dir)


# ---------------------------------------------------------------------------------------------
# 5. The code-hash wait, and the engine watchdog.
# ---------------------------------------------------------------------------------------------

# The app's files, as the chart ships them in its ConfigMap and hashes them into serveConfigV2.
APP_FILES = "vllm_app*.py"


def code_digest(folder: Path) -> str:
    """The sha256 of the app's files (APP_FILES, in name order, one after the other), as the chart
    renders it into serveConfigV2."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob(APP_FILES)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _wait_for_current_code(path: Optional[Path] = None, timeout_s: float = 300, poll_s: float = 2) -> bool:
    """Whether this file is the version the Serve config expects; if not yet, wait for it.

    A code change reaches the cluster twice: the hash in serveConfigV2 (Serve restarts the app at
    once) and the ConfigMap volume (the kubelet refreshes it within a minute or two). When the
    restart wins that race, this process runs the old file: wait until the new one is on disk and
    return False, so the caller reloads it. Failing instead would burn Serve's few start retries
    and leave the app DEPLOY_FAILED.
    """
    expected = os.environ.get(CODE_HASH_ENV)
    folder = (path or Path(__file__)).parent
    if not expected or code_digest(folder) == expected:
        return True
    logger.warning("The app in %s is not the version the Serve config expects yet; waiting for the ConfigMap "
                   "update", folder)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if code_digest(folder) == expected:
            return False
    raise RuntimeError(f"The app's files in {folder} still do not have sha256 {expected} after {timeout_s:.0f}s: "
                       "the app ConfigMap has not reached this pod. Check that it is mounted without subPath.")


class EngineWatchdog:
    """Notices an engine that holds requests but makes no progress (hung, not dead: e.g. a stopped
    or deadlocked EngineCore), which vLLM's own health check does not see: it only asks whether
    the engine process is alive.

    Progress is an engine step (vLLM's stat-logger hook, see _engine_steps), not an output token,
    so a long prefill that takes many steps is progress. The engine owes a step when its last step
    left it holding requests (its own count, running and waiting), or when the frontend gave it new
    requests since that step. The frontend's count alone is not the test: a request the engine has
    finished can stay counted there while its client's stream drains (seen with a client that
    stopped reading), and an idle engine makes no steps. When the engine owes a step for `stall_s`
    seconds, the watchdog kills the engine's processes: vLLM then ends every request in flight with
    its engine-dead error (an error frame then [DONE] in a stream), /health answers 503, and Serve's
    health check (check_health) replaces the replica.

    A request waiting for its structured-output grammar to compile is not a stall either: vLLM 0.29's
    engine keeps stepping while it holds such a request (the scheduler skips it; EngineCore.step
    runs as long as the scheduler has requests) and sends its stats after every step, even one that
    scheduled nothing (Scheduler.update_from_output), so the watchdog sees steps throughout.
    """

    def __init__(self, engine, stall_s: float):
        self.engine, self.stall_s = engine, stall_s
        self.last_step = time.monotonic()
        self.engine_holds = 0  # requests the engine held after its last step
        self.sent_since_step = False  # the frontend took new requests after that step
        self.stalled: Optional[str] = None

    def step(self, engine_holds: int) -> None:
        self.last_step = time.monotonic()
        self.engine_holds = engine_holds
        self.sent_since_step = False

    async def run(self, poll_s: float = 1.0) -> None:
        owed_since = None
        frontend_before = self.engine.get_num_unfinished_requests()
        while self.stalled is None:
            await asyncio.sleep(min(poll_s, self.stall_s / 4))
            now = time.monotonic()
            frontend = self.engine.get_num_unfinished_requests()
            if frontend > frontend_before:
                self.sent_since_step = True
            frontend_before = frontend
            if not frontend or not (self.engine_holds or self.sent_since_step):
                owed_since = None
                continue
            owed_since = owed_since or now
            idle_s = now - max(self.last_step, owed_since)
            if idle_s >= self.stall_s:
                self.stalled = (f"the vLLM engine made no step in {idle_s:.0f} s while it held "
                                f"{max(self.engine_holds, 1)} request(s) (serving.engineStallSeconds="
                                f"{self.stall_s:g}): it is hung")
                logger.error("%s; killing its processes %s so that its requests end and Serve replaces this "
                             "replica", self.stalled, kill_engine_processes())

    def check(self) -> None:
        if self.stalled is not None:
            raise RuntimeError(self.stalled)


# ---------------------------------------------------------------------------------------------
# 6. The deployment: one Serve deployment and the HTTP ingress, so the proxy hands each request
#    straight to the replica that runs the engine. Its ASGI app is built once the engine exists
#    (Serve calls __serve_build_asgi_app__ after the constructor). Replica counts, autoscaling,
#    queue limits and resources come from serveConfigV2, not code.
# ---------------------------------------------------------------------------------------------


class _Steps:
    """The engine's step callback, forwarded to the watchdog once it exists (the engine steps
    during the warm-up, before the watchdog starts)."""

    watchdog: Optional[EngineWatchdog] = None

    def __call__(self, engine_holds: int) -> None:
        if self.watchdog is not None:
            self.watchdog.step(engine_holds)


@serve.deployment(name="VLLMServer")
@serve.ingress()
class VLLMServer:
    async def __init__(self, args: AppArgs):
        if not await asyncio.to_thread(_wait_for_current_code):
            # This process already imported the old file; a fresh replica imports the new one.
            raise RuntimeError("the app code on this pod changed while the replica started; "
                               "Serve restarts it with the new code")
        keys = _api_keys(args.serving)
        self.engine = self.watchdog = None
        steps = _Steps()
        try:
            if problem := model_path_problem(args):
                raise SettingError(problem)
            # Loading the model inside the constructor keeps the replica out of rotation until it is ready.
            self.engine, vllm_app = await start_vllm_server(args, on_step=steps)
            if args.serving.warmup:
                seconds = await warm_up(self.engine, await self.engine.get_supported_tasks())
                logger.info("Warm-up generation done in %.2f s", seconds)
        except SettingError as error:
            # One line first, in the replica's log and in the status Serve (and so KubeRay) reports.
            logger.error("%s %s", START_FAILED, error)
            raise RuntimeError(f"{START_FAILED} {error}") from None
        except Exception as error:
            logger.error("%s the vLLM engine failed to start or to warm up: %s (the traceback follows; "
                         "README, Troubleshooting)", START_FAILED, _one_line(error))
            if self.engine is not None:
                self.engine.shutdown()
            raise
        self.watchdog = steps.watchdog = EngineWatchdog(self.engine, args.serving.engine_stall_seconds)
        self._watching = asyncio.create_task(self.watchdog.run())
        self.quotas = vllm_app_quotas.start(args.serving.key_policies_file, serve.get_replica_context().app_name,
                                            args.serving.priority_scheduling)
        self.gate = Gate(vllm_app, keys, args.serving.log_prompts, UsageMetrics(), self.quotas)

    def __serve_build_asgi_app__(self):
        return self.gate

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        self.watchdog.check()
        await self.engine.check_health()

    def get_stats(self) -> dict:
        """Request counters and the engine's unfinished requests, for operators and tests (through
        a Serve handle, not HTTP)."""
        return {**self.gate.stats, "engine_unfinished": self.engine.get_num_unfinished_requests(),
                "pid": os.getpid(), "lora_adapters": lora_adapters_held(self.gate.app)}

    def record_routing_stats(self) -> dict:
        """Serve polls this for the routers of serving.routing (vllm_app_routing.py): the load and
        the adapters that a routing decision weighs."""
        return vllm_app_routing.routing_stats(self.gate.stats["in_flight"], self.gate.stats["requests"],
                                              lora_adapters_held(self.gate.app))

    def __del__(self):
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()


# ---------------------------------------------------------------------------------------------
# 7. The builder: serveConfigV2's `import_path: vllm_app:build_app`, called with `args`.
# ---------------------------------------------------------------------------------------------


def build_app(args: dict) -> serve.Application:
    if not _wait_for_current_code():
        import importlib
        import sys

        # Serve imported the old file; build from the new one.
        return importlib.reload(sys.modules[__name__]).build_app(args)
    try:
        app_args = AppArgs.model_validate(args)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ValueError(f"Invalid vllm_app args: {problems}") from None
    try:
        # vLLM's own parsing and checks of every engine/frontend value, before any replica starts,
        # so a bad value fails the deploy at once with one line naming it.
        vllm_server_args(app_args, on_replica=False)
    except ModuleNotFoundError:
        pass  # a controller without vLLM: the replica checks when it builds vLLM's arguments
    except SettingError as error:
        raise ValueError(f"{START_FAILED} {error}") from None
    try:
        return vllm_app_routing.routed_app(VLLMServer, (app_args,), app_args.serving.routing, app_args.model.name)
    except RuntimeError as error:  # a Ray whose routing hook differs
        raise ValueError(f"{START_FAILED} {error}") from None
