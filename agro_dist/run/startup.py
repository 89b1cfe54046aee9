"""A run's start-up on Ray, in the order the driver calls it: the model checked, Ray joined (or a
private one started), the cluster's room checked, the private Redis started, the actors placed
(generators, learner ranks in a placement group, the eval actor).

Functions of the run's :class:`Config` that return what they made; the driver
(``agro_dist/run/driver.py``) holds it and runs the training loops (``agro_dist/run/loops.py``). Anything
that cannot start raises :class:`StartupError` with a message that says what and why (exit 3).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

import ray

from agro_dist.run.config import Config

log = logging.getLogger("agro_dist")


class StartupError(RuntimeError):
    """A part cannot start: the message says which and why; the driver exits with status 3.
    ``abandoned``: a start-up call never returned (Ray's client retrying a dead head for ever):
    the process exits without waiting for it."""

    def __init__(self, message: str, *, abandoned: bool = False):
        super().__init__(message)
        self.abandoned = abandoned


def first_line(e: BaseException) -> str:
    """The informative end of an exception's text (Ray wraps the actor's traceback)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    for i in range(len(lines) - 1, -1, -1):  # the last line naming an exception type, plus what follows
        if "Error" in lines[i].split(":")[0] or "Exception" in lines[i].split(":")[0]:
            return " ".join(lines[i:])[:600]
    return (lines[-1] if lines else type(e).__name__)[:600]


def redact(url: str) -> str:
    """A Redis URL fit for a log: the password replaced by ***."""
    return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", re.sub(r"password=[^&]*", "password=***", url))


# ---------------------------------------------------------------------- the model, Ray, room


def check_model(cfg: Config) -> None:
    from agro_dist.io.models import resolve_model

    for what, m in (("model", cfg.model), ("learner.ref_model", cfg.learner.ref_model)):
        if m is None:
            continue
        try:
            resolve_model(m)
        except Exception as e:  # a missing folder, a broken GGUF conversion
            raise StartupError(f"{what} {m!r} cannot be loaded: {e}") from None


def start_ray(cfg: Config) -> bool:
    """Join the configured cluster (``run.ray_address``, else ``RAY_ADDRESS``, as inside a Ray
    job), or start a private local Ray (returns True then). Joining is bounded by
    ``run.connect_timeout_s``: Ray's own client retries a dead head forever."""
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    timeout = cfg.run.connect_timeout_s
    # Actors inherit this; vLLM's INFO lines would drown the progress line.
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"), "TOKENIZERS_PARALLELISM": "false",
           **{k: str(v) for k, v in cfg.run.env_vars.items()}}  # the user's, for every actor
    if address:
        where = "run.ray_address" if cfg.run.ray_address else "RAY_ADDRESS"
        probe_ray(address, where, timeout)
        ctx = _join_cluster(dict(address=address, runtime_env={"env_vars": env}, log_to_driver=True), address, where, timeout)
    else:
        log.info("no Ray address configured (run.ray_address, RAY_ADDRESS): starting a private local Ray")
        # "local": always a Ray of our own. Without it ray.init() joins whatever cluster Ray's
        # temp folder last recorded (ray_current_cluster), even a dead one (issue 18). In the main
        # thread: Ray ties the head's processes to the thread that starts them.
        own_ray_tmpdir()
        # Ray's warning that token auth is on: the dashboard line below says how to get in.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        try:
            ctx = ray.init(address="local", runtime_env={"env_vars": env}, include_dashboard=True, dashboard_host="127.0.0.1",
                           log_to_driver=True, object_store_memory=object_store_bytes(cfg))
        except Exception as e:
            raise StartupError(f"cannot start a local Ray: {first_line(e)}") from None
    url = getattr(ctx, "dashboard_url", None)
    # Ray 2.60's dashboard asks for the cluster's token first (token auth is on unless RAY_AUTH_MODE=disabled).
    login = "" if not url or os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" else \
        " (it asks for a token: `ray get-auth-token` prints it)"
    log.info("Ray %s: %s CPU, %s GPU; dashboard http://%s%s", address or "local (started here)",
             ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0), url or "(not running)", login)
    return not address


def own_ray_tmpdir() -> str:
    """Before a private local Ray starts: its processes' temporary folder becomes
    ``<tmp>/agro_dist-run-<pid>`` (``TMPDIR``, which they inherit), removed when the run ends
    (``Driver.close``) or, after a killed driver, by the next run (``remove_dead_tmpdirs``). Ray's
    dashboard runs its modules through a multiprocessing forkserver, killed at shutdown, which left
    a ``pymp-*/listener-*`` folder in the temp folder after every run. Ray's session folder
    (``RAY_TMPDIR``) and torch's compile cache (``TORCHINDUCTOR_CACHE_DIR``) stay where they were,
    unless the user placed them."""
    import getpass

    base = os.environ.get("TMPDIR") or "/tmp"  # Ray's own choice on Linux (ray._common.utils)
    os.environ.setdefault("RAY_TMPDIR", base)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(base, "torchinductor_" + re.sub(r"[\\/:*?\"<>|]", "_", user)))
    from agro_dist.actors.generator import remove_dead_tmpdirs

    remove_dead_tmpdirs(base)
    d = os.path.join(base, f"agro_dist-run-{os.getpid()}")
    os.makedirs(d, exist_ok=True)
    os.environ["TMPDIR"] = d
    return d


def remove_own_ray_tmpdir() -> None:
    """The folder ``own_ray_tmpdir`` made, once its Ray has shut down."""
    import shutil

    d = os.environ.get("TMPDIR", "")
    if os.path.basename(d) == f"agro_dist-run-{os.getpid()}":
        os.environ["TMPDIR"] = os.path.dirname(d)
        shutil.rmtree(d, ignore_errors=True)


def object_store_bytes(cfg: Config) -> int:
    """``resources.object_store_gb``, or sized for what the store carries: published weights,
    one version while generators load it and the next being put (2.5 x the weights)."""
    gb = cfg.resources.object_store_gb
    if gb > 0:
        return int(gb * 1e9)
    from agro_dist.io.models import resolve_model, weights_bytes

    per_param = 4 if cfg.learner.dtype == "float32" else 2
    return max(int(2.5 * weights_bytes(resolve_model(cfg.model), per_param)), int(0.5e9))


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _join_cluster(kwargs: Dict[str, Any], address: str, where: str, timeout: float):
    """``ray.init`` against a cluster, in a helper thread so that a head which accepts the
    connection but never answers (Ray's client retries forever) cannot hang start-up."""
    done: Dict[str, Any] = {}

    def init():
        try:
            done["ctx"] = ray.init(**kwargs)
        except BaseException as e:  # handed to the main thread
            done["error"] = e

    quiet = _DropMessage("SIGTERM handler is not set")  # installed below, in the main thread
    logging.getLogger("ray._private.worker").addFilter(quiet)
    t = threading.Thread(target=init, name="ray-init", daemon=True)
    t.start()
    t.join(timeout)
    logging.getLogger("ray._private.worker").removeFilter(quiet)
    if t.is_alive():  # ray.init is stuck in Ray's own retry loop: main() exits without waiting for it
        raise StartupError(f"the Ray cluster at {address} ({where}) did not answer within run.connect_timeout_s={timeout:g} s: "
                           f"is the head up (`ray status --address {address}`), does this machine reach it (firewall, "
                           f"GCS port), and with token auth on, is RAY_AUTH_TOKEN (or ~/.ray/auth_token) the head's?", abandoned=True)
    if "error" in done:
        raise StartupError(f"cannot connect to the Ray cluster at {address} ({where}): {first_line(done['error'])}") from None
    # What ray.init does in the main thread: SIGTERM (`ray job stop`) exits through the
    # interpreter, so the driver's close() runs.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    return done["ctx"]


def probe_ray(address: str, where: str, timeout: float) -> None:
    """Fail fast when nothing listens at the cluster's address: a TCP connect to the GCS (or the
    Ray Client server of a ``ray://`` address) within ``timeout``. ``auto`` is resolved as Ray
    does (``RAY_ADDRESS``, then the ``ray_current_cluster`` file)."""
    from ray._private.services import get_ray_address_from_environment

    target = address
    if address == "auto":
        try:
            target = get_ray_address_from_environment("auto", None)
        except ConnectionError as e:
            raise StartupError(f"{where}=auto: {e}") from None
    hostport = target.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except ValueError:
        raise StartupError(f"{where}={address!r}: expected host:port, ray://host:port or auto") from None
    except OSError as e:
        why = "timed out" if isinstance(e, socket.timeout) else (e.strerror or str(e))
        raise StartupError(f"the Ray cluster at {address} ({where}) does not answer ({why}, {timeout:g} s limit): is the head up "
                           f"(`ray status --address {address}`), is the address right, does a firewall block its GCS port?") from None


def demand(cfg: Config) -> Dict[str, float]:
    """What the run's actors ask of the cluster, summed: CPU, GPU, memory (bytes), custom resources."""
    r = cfg.resources
    G, N = (0 if cfg.run.mode == "offline" else r.num_generators), r.learner_ranks
    E = 0 if cfg.eval_on_generator() else 1  # the eval actor, when there is one
    need = {
        "CPU": G * r.generator_cpus + N * r.learner_cpus + E * r.eval_cpus,
        "GPU": G * r.generator_gpus + N * r.learner_gpus + E * r.eval_gpus,
        "memory": 1e9 * (G * r.generator_memory_gb + N * r.learner_memory_gb + E * r.eval_memory_gb),
    }
    for count, custom in ((G, r.generator_resources), (N, r.learner_resources), (E, r.eval_resources)):
        for k, v in custom.items():
            need[k] = need.get(k, 0.0) + count * v
    return need


def check_resources(cfg: Config) -> None:
    have = ray.cluster_resources()
    short = []
    for k, v in demand(cfg).items():
        if v > have.get(k, 0.0) + 1e-9:
            unit = " GB" if k == "memory" else ""
            if k not in ("CPU", "GPU", "memory") and k not in have:
                short.append(f"{k}: requested {v:g}, no node has it (nodes get custom resources from `ray start --resources`)")
                continue
            scale = 1e-9 if k == "memory" else 1.0
            short.append(f"{k}: requested {v * scale:g}{unit}, cluster has {have.get(k, 0.0) * scale:g}{unit}")
    if short:
        r = cfg.resources
        raise StartupError("not enough resources for the requested actors (" + "; ".join(short) + f"). Requested: "
                           f"{r.num_generators} generator(s) x ({r.generator_cpus:g} CPU, {r.generator_gpus:g} GPU, "
                           f"{r.generator_memory_gb:g} GB), {r.learner_ranks} learner rank(s) x ({r.learner_cpus:g} CPU, "
                           f"{r.learner_gpus:g} GPU, {r.learner_memory_gb:g} GB)" + ("" if cfg.eval_on_generator() else
                           f", eval ({r.eval_cpus:g} CPU, {r.eval_gpus:g} GPU, {r.eval_memory_gb:g} GB)") +
                           "; lower the resources.* keys or add nodes")


# ---------------------------------------------------------------------- the buffer's Redis


def check_redis_url(cfg: Config) -> str:
    """``buffer.redis_url``, once it answered a PING within ``run.connect_timeout_s``."""
    from agro_dist.buffer.client import connect

    url, t = cfg.buffer.redis_url, cfg.run.connect_timeout_s
    try:
        with connect(url, socket_connect_timeout=t, socket_timeout=t, retry=None) as c:
            c.ping()
    except Exception as e:
        raise StartupError(f"Redis unreachable at {redact(url)} (buffer.redis_url; {t:g} s limit): {e}") from None
    return url


def start_private_redis(cfg: Config, run_dir: str, own_ray: bool):
    """The run's own Redis, in ``run_dir/redis`` (its append-only file is the buffer's state).

    On a cluster the actors on other nodes must reach it: bound to this node's cluster address
    (never 0.0.0.0), protected mode on. On a cluster or not, a password made for this run (another
    local user could otherwise write groups with chosen rewards into it): it travels in the URL
    given to the actors' constructors (not in logs, config.yaml, env vars or anything the dashboard
    shows). A private local Ray keeps it on 127.0.0.1."""
    from agro_dist.buffer.server import RedisServer

    b = cfg.buffer
    node_ip = ray.util.get_node_ip_address()
    cluster = not own_ray and node_ip not in ("127.0.0.1", "localhost", "::1")
    try:
        return RedisServer(os.path.join(run_dir, "redis"), port=b.redis_port or None, appendfsync=b.appendfsync,
                           maxmemory=str(redis_maxmemory(b.redis_maxmemory_gb)),
                           host=node_ip if cluster else "127.0.0.1").start()  # a password of its own, always
    except Exception as e:
        raise StartupError(f"cannot start the private Redis (buffer.redis_port={b.redis_port}): {e}") from None


def redis_maxmemory(gb: float) -> int:
    """The private Redis's memory limit in bytes: ``gb`` GiB, or (0) a quarter of this node's memory
    (its cgroup's limit where that is lower). Full, the buffer evicts the oldest history and then
    holds the generators back; without a limit Redis would grow until the OOM killer stops it."""
    if gb:
        return int(gb * (1 << 30))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // 4


def buffer_options(cfg: Config) -> Dict[str, Any]:
    """The learner ranks' ReplayBuffer settings."""
    b = cfg.buffer
    # Frozen generators fall further behind every step: no staleness bound (it is recorded).
    max_staleness = None if cfg.run.mode == "frozen" else cfg.run.max_staleness
    # Frozen groups all carry version 0: a window in versions would empty the history.
    window = 0 if cfg.run.mode == "frozen" else b.replay_window
    # The driver plans each step's replayed groups (replay_groups): replay_prob here is only the
    # default of a direct sample() call.
    return dict(name=cfg.run.name, seed=cfg.run.seed, replay_prob=cfg.fixed_replay_prob, max_staleness=max_staleness,
                history_max_groups=b.history_max_groups, history_max_bytes=b.history_max_bytes, claim_idle_s=b.claim_idle_s,
                replay_window=window, replay_weighting=b.replay_weighting, replay_max_uses=b.replay_max_uses,
                timeout_s=cfg.run.step_timeout_s)


# ---------------------------------------------------------------------- the actors


def actor_options(cfg: Config, kind: str, role: str) -> Dict[str, Any]:
    r = cfg.resources
    cpus, gpus, mem, custom = {"generator": (r.generator_cpus, r.generator_gpus, r.generator_memory_gb, r.generator_resources),
                               "learner": (r.learner_cpus, r.learner_gpus, r.learner_memory_gb, r.learner_resources),
                               "eval": (r.eval_cpus, r.eval_gpus, r.eval_memory_gb, r.eval_resources)}[kind]
    # Ray gives an actor OMP_NUM_THREADS = its CPU request (1 here); on a small machine where
    # the parts take turns (sync mode) each should use every core while it runs.
    threads = r.threads or os.cpu_count() or 1
    env = {"OMP_NUM_THREADS": str(threads)}
    if kind != "learner":
        # vLLM's C++ start-up warnings (on CPU: "NUMA binding: Using MEMBIND policy ...") go
        # straight to stderr, past Python's filters; a user's own setting still wins.
        env["TORCH_CPP_LOG_LEVEL"] = os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR")
    opts = dict(num_cpus=cpus, num_gpus=gpus, name=f"{cfg.run.name}-{role}", namespace="agro_dist",
                runtime_env={"env_vars": env})
    if mem:
        opts["memory"] = int(mem * 1e9)
    if custom and kind != "learner":  # a learner rank gets its custom resources through its placement-group bundle
        opts["resources"] = dict(custom)
    return opts


def loads_overlap(cfg: Config) -> bool:
    """Whether the generators (and the eval actor) load their models while the learner loads its
    own: start-up then takes the longer of the two, not their sum (on CPU each load is one core of
    imports and reads; ~12 of ~40 s of a short run here). Not when two of them may share a GPU
    (fractional GPUs): vLLM sizes its KV cache from the memory free while it starts."""
    r = cfg.resources
    shared = [g for g in (r.generator_gpus, r.learner_gpus, r.eval_gpus) if 0 < g < 1]
    return len(shared) < 2


def start_generators(cfg: Config, buffer_url: str) -> List[Any]:
    """The generator actors, loading their models (the caller's ``wait_ready`` waits for them)."""
    from agro_dist.actors.generator import GeneratorActor

    r = cfg.resources
    gens = [GeneratorActor.options(max_restarts=r.generator_max_restarts, max_task_retries=0,
                                   **actor_options(cfg, "generator", f"generator-{i}")).remote(
                cfg.generator_config(i), buffer_url=buffer_url,
                # A full buffer holds a put back until the learner trains; no longer than a step may take.
                buffer_options={"name": cfg.run.name, "room_timeout_s": cfg.run.step_timeout_s})
            for i in range(r.num_generators)]
    return gens


def start_evaluator(cfg: Config):
    """The eval actor, loading its model (the caller's ``wait_ready`` waits for it)."""
    from agro_dist.actors.generator import GeneratorActor

    a = GeneratorActor.options(max_restarts=-1, max_task_retries=-1, **actor_options(cfg, "eval", "eval")).remote(
        cfg.eval_generator_config())
    return a


def start_learner(cfg: Config, buffer_url: Optional[str], buffer_opts: Dict[str, Any]) -> Tuple[List[Any], Any]:
    """The learner's ranks, in a placement group (``resources.learner_placement``) when they ask
    for resources; rank 0's node hosts the torch.distributed rendezvous. Returns (ranks, group)."""
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from agro_dist.learner.actor import LearnerActor

    r = cfg.resources
    N = r.learner_ranks
    bundle = {"CPU": r.learner_cpus, "GPU": r.learner_gpus, "memory": r.learner_memory_gb * 1e9, **r.learner_resources}
    bundle = {k: v for k, v in bundle.items() if v}
    pg = placement_group([bundle] * N, strategy=r.learner_placement) if bundle else None
    master_addr, master_port = "127.0.0.1", None
    if pg is not None:
        wait_s = cfg.run.startup_timeout_s
        if not pg.wait(timeout_seconds=wait_s):
            raise StartupError(f"the learner's {N} rank(s) ({bundle} each) could not be placed within run.startup_timeout_s="
                               f"{wait_s:g} s: the cluster lacks these resources on its nodes (see `ray status`)")
        # Rank 0's node hosts the torch.distributed rendezvous: ask a task placed there.
        limit = max(cfg.run.connect_timeout_s, 60)
        try:
            master_addr, master_port = ray.get(_rendezvous.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0), num_cpus=0).remote(), timeout=limit)
        except ray.exceptions.GetTimeoutError:
            raise StartupError(f"the learner's rendezvous (a task on rank 0's node) did not answer within {limit:g} s: "
                               "is that node alive (see `ray status`)?") from None
    ranks = []
    for rank in range(N):
        opts = actor_options(cfg, "learner", f"learner-{rank}")
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
        ranks.append(LearnerActor.options(max_restarts=0, **opts).remote(
            cfg.learner_config(), rank=rank, world_size=N, master_addr=master_addr,
            master_port=master_port if N > 1 else None, buffer_url=buffer_url, buffer_options=buffer_opts))
    wait_ready(cfg, ranks, "learner")
    return ranks, pg


def remove_learner(ranks: List[Any], pg) -> None:
    """Kill every rank (a lost one broke the collective) and free their placement group."""
    for a in ranks:
        ray.kill(a, no_restart=True)
    if pg is not None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(pg)


def wait_ready(cfg: Config, actors: List[Any], what: str) -> None:
    wait_s = cfg.run.startup_timeout_s
    try:
        ray.get([a.get_version.remote() if what != "learner" else a.version.remote() for a in actors], timeout=wait_s)
    except ray.exceptions.GetTimeoutError:
        raise StartupError(f"{what} actor(s) not ready within run.startup_timeout_s={wait_s:g} s: resources pending (see "
                           "`ray status` and the dashboard's Actors page), or a model load or rendezvous that hangs") from None
    except Exception as e:
        raise StartupError(f"{what} actor failed to start: {first_line(e)}") from None


def node_addresses(actors: List[Tuple[str, Any]], timeout_s: float = 60) -> Dict[str, Optional[str]]:
    """name -> the address of the node each actor runs on (None for one that does not answer:
    restarting, or on a node being lost).

    First from the GCS's actor table (an ALIVE actor's address), which does not wait on the actor:
    asked through a call, a restarted generator answered only after the generate call queued ahead
    of it, and past the timeout on a loaded machine the driver logged "(its node did not say)"
    (the flaky cluster test of issue 37). Actors the table does not place are asked."""
    out: Dict[str, Optional[str]] = {name: _gcs_address(a) for name, a in actors}
    ask = [(name, a) for name, a in actors if out[name] is None]
    refs = [a.__ray_call__.remote(lambda _self: ray.util.get_node_ip_address()) for _, a in ask]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for (name, _), ref in zip(ask, refs):
        try:
            out[name] = ray.get(ref, timeout=0)
        except Exception:  # informative only
            out[name] = None
    return out


class Placement:
    """Which node (address) each actor runs on, as last known, and the nodes already dead when the
    run started: what the placement line and the failure messages say. Shared by the roles."""

    def __init__(self) -> None:
        self.where: Dict[str, str] = {}
        self.dead_at_start = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}

    def record(self, actors: List[Tuple[str, Any]]) -> Dict[str, Optional[str]]:
        """Asks where each of these ``(name, actor)`` runs (None for one not answering) and keeps it."""
        where = node_addresses(actors)
        self.where.update({k: v for k, v in where.items() if v})
        return where

    def note(self, name: str, actor: Any, where: Optional[str]) -> Optional[str]:
        """An actor back from a restart: where it said it runs, or asked (30 s at most); kept."""
        if not where:
            where = node_addresses([(name, actor)], timeout_s=30)[name]
        if where:
            self.where[name] = where
        return where

    def dead_nodes(self) -> str:
        """" (Ray reports node 10.0.0.3 dead)" for nodes lost since start-up, for a failure's message."""
        try:
            dead = [n["NodeManagerAddress"] for n in ray.nodes() if not n["Alive"] and n["NodeID"] not in self.dead_at_start]
        except Exception:  # informative only
            return ""
        return f" (Ray reports node{'s' if len(dead) > 1 else ''} {', '.join(sorted(set(dead)))} dead)" if dead else ""


def _gcs_address(actor: Any) -> Optional[str]:
    """The node address of an ALIVE actor from Ray's actor table (ray._private.state: no public
    call gives it without the dashboard); None when unknown or not alive."""
    try:
        from ray._private import state

        info = state.actors(actor_id=actor._actor_id.hex())
        if info and info.get("State") == "ALIVE":
            return (info.get("Address") or {}).get("IPAddress") or None
    except Exception:  # informative only: the caller asks the actor instead
        pass
    return None


@ray.remote
def _rendezvous():
    """(IP, free port) of the node this runs on: where learner rank 0's rendezvous listens."""
    from agro_dist.buffer.server import free_port

    return ray.util.get_node_ip_address(), free_port("")
