"""A fake kubelet: runs the pods of the test cluster as local processes.

The operator's Jobs and Deployments must really run (the trainer, the adapter
server) for end-to-end tests to mean anything, but the test machine has no
container runtime. This kubelet registers a Node, binds every unscheduled pod
to it (there is no scheduler), and runs each container's command on the host,
with the pod's environment, volumes as per-pod folders and a loopback IP per
pod. It reports status the way the real kubelet does, because the Job,
ReplicaSet, Deployment, EndpointSlice and namespace controllers act on it.

What it does not do: images (the command runs from this machine's PATH),
resource limits, mount namespaces (mount paths are rewritten in the command
line and environment instead), networking beyond loopback, preStop hooks.

Run it as ``python -m tests.cluster.kubelet --kubeconfig K --workdir W``.
Each container's output goes to ``W/pods/<namespace>_<pod>_<uid>/<container>.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import platform
import shlex
import shutil
import signal
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tests.cluster.kubeapi import STRATEGIC_MERGE_PATCH, ApiError, KubeApi, Obj
from tests.cluster.podspec import (
    PathMapper,
    expand,
    field_value,
    is_env_name,
    now,
    parse_time,
    resource_value,
)
from tests.cluster.procs import die_with_parent

log = logging.getLogger("fake-kubelet")

HOST_IP = "127.0.0.1"
NODE_RESOURCES = {
    "cpu": "16",
    "memory": "64Gi",
    "pods": "110",
    "nvidia.com/gpu": "8",
    "ephemeral-storage": "200Gi",
}
HEARTBEAT_SECONDS = 10.0
MAX_BACKOFF_SECONDS = 10.0
# Host variables a container inherits, standing in for the image's own
# environment. Deliberately not KUBECONFIG or AWS_*: a pod must authenticate
# the way a real pod would, through what its spec gives it.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "PYTHONPATH")
TERMINAL_PHASES = ("Succeeded", "Failed")
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
MAX_TERMINATION_MESSAGE_BYTES = 4096
# What the real kubelet takes from the log for FallbackToLogsOnError.
FALLBACK_LOG_BYTES = 2048
FALLBACK_LOG_LINES = 80
DEFAULT_FILE_MODE = 0o644
LOST_MESSAGE = "The container could not be located when the pod was terminated"


class ConfigError(Exception):
    """Something the pod refers to is missing; the real kubelet keeps retrying."""


class StartError(Exception):
    """The container cannot start at all (reported like containerd: exit code 128)."""


def spawn_task(tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
    """Run ``coro`` in the background, keep a reference, and log if it crashes."""
    task = asyncio.create_task(coro, name=what)
    tasks.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("%s crashed", what, exc_info=t.exception())

    task.add_done_callback(done)
    return task


def kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class Launch:
    """A container's command line and environment after expansion and path rewriting."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    mapper: PathMapper


class Container:
    """One container of a pod: its spec, its current process and its reported state."""

    def __init__(self, spec: Obj, *, init: bool, pod_has_init: bool) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.sidecar = init and spec.get("restartPolicy") == "Always"
        waiting = "PodInitializing" if init or pod_has_init else "ContainerCreating"
        self.state: Obj = {"waiting": {"reason": waiting}}
        self.last_state: Obj = {}
        self.restart_count = 0
        self.started = False
        self.ready = False
        self.exit_code: int | None = None
        self.container_id: str | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.launch: Launch | None = None
        self.started_event = asyncio.Event()
        self._backoff_exponent = 0

    def next_backoff(self, ran_for: float) -> float:
        """1s, 2s, 4s, ... capped; a run longer than the cap counts as healthy and resets it."""
        if ran_for >= MAX_BACKOFF_SECONDS:
            self._backoff_exponent = 0
        delay = min(MAX_BACKOFF_SECONDS, 2.0**self._backoff_exponent)
        self._backoff_exponent += 1
        return delay

    def is_running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def status(self) -> Obj:
        status: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


class PodWorker:
    """Runs one pod bound to this node, from Pending to deletion."""

    def __init__(self, kubelet: Kubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta = pod["metadata"]
        spec = pod["spec"]
        status = pod.get("status", {})
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = f"{self.namespace}/{self.name}"
        self.dir = kubelet.pods_dir / f"{self.namespace}_{self.name}_{self.uid}"
        self.ip = kubelet.allocate_ip(status.get("podIP"))
        self.start_time: str = status.get("startTime") or now()
        self.phase: str = status.get("phase", "Pending")
        self.reason: str | None = None
        self.message: str | None = None
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        has_init = bool(spec.get("initContainers"))
        self.init_containers = [Container(c, init=True, pod_has_init=True) for c in spec.get("initContainers", [])]
        self.containers = [Container(c, init=False, pod_has_init=has_init) for c in spec["containers"]]
        self.initialized = not has_init
        self.sandbox_ready = False
        self.volume_paths: dict[str, Path] = {}
        self.stop_event = asyncio.Event()
        self.deleting = asyncio.Event()
        self._owns_status = False
        self._dirty = asyncio.Event()
        self._patch_lock = asyncio.Lock()
        self._last_sent: Obj | None = None
        self._transitions: dict[str, tuple[bool, str]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.update(pod)
        spawn_task(self._tasks, self._run(), f"pod {self.key}")

    # ---- lifecycle -------------------------------------------------------

    def update(self, pod: Obj) -> None:
        """A newer version of the pod arrived from the watch."""
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()
        if pod["spec"].get("readinessGates"):
            self._mark()

    def all_containers(self) -> list[Container]:
        return [*self.init_containers, *self.containers]

    def processes(self) -> list[asyncio.subprocess.Process]:
        return [c.process for c in self.all_containers() if c.process is not None and c.is_running()]

    def abort(self) -> None:
        """Kill everything now: the pod is gone from the API or the kubelet stops."""
        for process in self.processes():
            kill_group(process.pid, signal.SIGKILL)
        for task in list(self._tasks):
            task.cancel()
        self.kubelet.release_ip(self.ip)

    async def _run(self) -> None:
        spawn_task(self._tasks, self._publish_loop(), f"status of {self.key}")
        life: asyncio.Task[None] | None = None
        if self.phase in TERMINAL_PHASES:
            log.info("%s: already %s; nothing to run", self.key, self.phase)
        elif self._started_by_someone_else():
            self._lose_containers()
        elif not self.deleting.is_set():
            self._owns_status = True
            life = spawn_task(self._tasks, self._lifecycle(), f"lifecycle of {self.key}")
            deadline = self.pod["spec"].get("activeDeadlineSeconds")
            if deadline is not None:
                spawn_task(self._tasks, self._enforce_deadline(float(deadline)), f"deadline of {self.key}")
        await self.deleting.wait()
        await self._terminate(life)

    def _started_by_someone_else(self) -> bool:
        """True when a previous kubelet ran this pod; its processes died with it."""
        status = self.pod.get("status", {})
        statuses = [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]
        return any("running" in s.get("state", {}) or "terminated" in s.get("state", {}) for s in statuses)

    def _lose_containers(self) -> None:
        log.warning("%s: was started by an earlier kubelet; its processes are gone, failing it", self.key)
        self._owns_status = True
        self.initialized = True
        self._set_terminal(
            "Failed", "ContainerStatusUnknown", "the fake kubelet restarted and lost this pod's processes"
        )

    async def _lifecycle(self) -> None:
        try:
            for sub in ("volumes", "termination"):
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
            self.sandbox_ready = True
            self._mark()
            if not await self._prepare_volumes():
                return
            for container in self.init_containers:
                if self.stop_event.is_set():
                    return
                if container.sidecar:
                    spawn_task(
                        self._tasks, self._container_loop(container, "Always"), f"sidecar {self.key}/{container.name}"
                    )
                    await self._first_of(container.started_event)
                    continue
                policy = "Never" if self.restart_policy == "Never" else "OnFailure"
                if await self._container_loop(container, policy) != 0:
                    if not self.stop_event.is_set():
                        await self._finish("Failed")
                    return
            self.initialized = True
            self._mark()
            codes = await asyncio.gather(*(self._container_loop(c, self.restart_policy) for c in self.containers))
            if not self.stop_event.is_set():
                await self._finish("Succeeded" if all(code == 0 for code in codes) else "Failed")
        except Exception as e:
            log.exception("%s: the fake kubelet failed to run this pod", self.key)
            self.stop_event.set()
            await self._kill_all(0)
            self._set_terminal("Failed", "FakeKubeletError", f"{type(e).__name__}: {e}")

    async def _finish(self, phase: str) -> None:
        self._set_terminal(phase)
        await self._kill_all(self._grace_period())  # sidecars

    def _set_terminal(self, phase: str, reason: str | None = None, message: str | None = None) -> None:
        self.stop_event.set()
        self.phase, self.reason, self.message = phase, reason, message
        for container in self.all_containers():
            if "waiting" in container.state:
                container.state = {
                    "terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown", "message": LOST_MESSAGE}
                }
            container.ready = False
        log.info("%s: %s%s", self.key, phase, f" ({reason}: {message})" if reason else "")
        self._mark()

    async def _enforce_deadline(self, seconds: float) -> None:
        elapsed = (datetime.now(UTC) - parse_time(self.start_time)).total_seconds()
        await asyncio.sleep(max(0.0, seconds - elapsed))
        if self.phase in TERMINAL_PHASES or self.stop_event.is_set():
            return
        self.stop_event.set()
        await self._kill_all(self._grace_period())
        self._set_terminal(
            "Failed", "DeadlineExceeded", "Pod was active on the node longer than the specified deadline"
        )

    async def _terminate(self, life: asyncio.Task[None] | None) -> None:
        """Graceful deletion: SIGTERM, SIGKILL after the grace period, then remove the pod object."""
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        grace = float(grace) if grace is not None else self._grace_period()
        log.info("%s: deleting (grace %.0fs)", self.key, grace)
        self.stop_event.set()
        await self._kill_all(grace)
        if life is not None:
            done, _ = await asyncio.wait({life}, timeout=5)
            if not done:
                life.cancel()
                await asyncio.wait({life})
        if self._owns_status:
            if self.phase not in TERMINAL_PHASES and any(c.exit_code is not None for c in self.containers):
                self._set_terminal("Succeeded" if all(c.exit_code == 0 for c in self.containers) else "Failed")
            await self._flush()
        options = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        while True:
            try:
                await self.kubelet.api.request(
                    "DELETE", f"/api/v1/namespaces/{self.namespace}/pods/{self.name}", body=options
                )
                break
            except ApiError as e:
                if e.status in (404, 409):  # gone already, or a new pod of the same name
                    break
                log.warning("%s: delete failed: %s", self.key, e)
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("%s: delete failed: %s", self.key, e)
            await asyncio.sleep(1)
        log.info("%s: deleted", self.key)

    def _grace_period(self) -> float:
        return float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))

    async def _first_of(self, event: asyncio.Event) -> None:
        """Wait for ``event`` or for the pod to stop, whichever comes first."""
        waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self.stop_event.wait())}
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.stop_event.wait(), seconds)
        except TimeoutError:
            return False
        return True

    # ---- containers ------------------------------------------------------

    async def _container_loop(self, container: Container, policy: str) -> int:
        """Run a container, restarting it as ``policy`` says; return its last exit code."""
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            code = await self._run_once(container)
            if self.stop_event.is_set() or policy == "Never" or (policy == "OnFailure" and code == 0):
                return code
            delay = container.next_backoff(loop.time() - began)
            container.last_state = container.state
            container.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:.0f}s restarting failed container={container.name} "
                    f"pod={self.name}_{self.namespace}({self.uid})",
                }
            }
            self._mark()
            if await self._stopped_within(delay):
                return code
            container.restart_count += 1

    async def _run_once(self, container: Container) -> int:
        """Start the container's process, probe it, wait for it to exit and record how."""
        log_path = self.dir / f"{container.name}.log"
        message_file = self._termination_file(container)
        offset = 0
        started_at = now()
        container.container_id = None
        try:
            launch = await self._prepare_launch(container)
            if launch is None:
                return 137  # the pod stopped before the container could start
            container.launch = launch
            message_file.unlink(missing_ok=True)
            message_file.touch()
            offset = log_path.stat().st_size if log_path.exists() else 0
            started_at = now()
            container.container_id = f"fake://{uuid.uuid4().hex}"
            executable = self._resolve(launch.argv[0], launch.cwd)
            with log_path.open("ab") as out:
                process = await asyncio.create_subprocess_exec(
                    executable,
                    *launch.argv[1:],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    env=launch.env,
                    cwd=launch.cwd,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
        except (StartError, OSError) as e:
            terminated: Obj = {"exitCode": 128, "reason": "StartError", "message": str(e), "finishedAt": now()}
            if container.container_id:
                terminated["containerID"] = container.container_id
            container.state = {"terminated": terminated}
            container.exit_code = 128
            log.warning("%s: container %s cannot start: %s", self.key, container.name, e)
            self._mark()
            return 128
        container.process = process
        # Tests kill a container's process the way an OOM killer or a node failure would.
        (log_path.parent / f"{container.name}.pid").write_text(str(process.pid))
        log.info("%s: started %s (pid %d): %s", self.key, container.name, process.pid, shlex.join(launch.argv))
        container.state = {"running": {"startedAt": started_at}}
        container.started = "startupProbe" not in container.spec
        container.ready = container.started and "readinessProbe" not in container.spec
        if container.started:
            container.started_event.set()
        if not container.init and self.phase == "Pending":
            self.phase = "Running"
        probes = self._start_probes(container)
        self._mark()
        if self.stop_event.is_set():  # a deletion raced with the start
            spawn_task(self._tasks, self._kill(container, self._grace_period()), f"kill {self.key}/{container.name}")
        try:
            returncode = await process.wait()
        finally:
            for probe in probes:
                probe.cancel()
            # The main process is gone; whatever it left behind in its group goes too,
            # as it would with the container's PID namespace.
            kill_group(process.pid, signal.SIGKILL)
            container.process = None
        code = returncode if returncode >= 0 else 128 - returncode
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started_at,
            "finishedAt": now(),
            "containerID": container.container_id,
        }
        if returncode < 0:
            terminated["signal"] = -returncode
        message = self._termination_message(container, message_file, log_path, offset, code)
        if message:
            terminated["message"] = message
        container.state = {"terminated": terminated}
        container.started = container.ready = False
        container.started_event.clear()
        container.exit_code = code
        log.info("%s: container %s exited with %d", self.key, container.name, code)
        self._mark()
        return code

    async def _prepare_launch(self, container: Container) -> Launch | None:
        """Resolve env and paths, retrying while something referenced is missing; None if the pod stops."""
        delay = 1.0
        while not self.stop_event.is_set():
            try:
                return await self._launch(container)
            except (ConfigError, ApiError, aiohttp.ClientError, TimeoutError) as e:
                container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                log.warning("%s: container %s: %s", self.key, container.name, e)
                self._mark()
                if await self._stopped_within(delay):
                    return None
                delay = min(2 * delay, MAX_BACKOFF_SECONDS)
        return None

    async def _launch(self, container: Container) -> Launch:
        spec = container.spec
        if not spec.get("command"):
            raise StartError("the fake kubelet does not know the image's entrypoint: give the container a command")
        env = await self._environment(container)
        mapper = PathMapper(self._mounts(container, env))
        argv = [mapper(expand(arg, env)) for arg in [*spec["command"], *spec.get("args", [])]]
        final_env = {name: mapper(value) for name, value in env.items()}
        return Launch(argv, final_env, self._working_dir(spec.get("workingDir"), mapper), mapper)

    def _working_dir(self, working_dir: str | None, mapper: PathMapper) -> Path:
        """The container's cwd: inside a volume when it is under a mount, else a per-pod folder.

        Like containerd, a missing working directory is created.
        """
        if not working_dir:
            return self.dir
        mapped = mapper(working_dir)
        path = Path(mapped) if mapped != working_dir else self.dir / "rootfs" / working_dir.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _resolve(self, command: str, cwd: Path) -> str:
        """Find the executable on the kubelet's PATH (the "image" is this machine)."""
        if "/" in command:
            path = cwd / command
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
            raise StartError(f'exec: "{command}": no such file or directory')
        found = shutil.which(command, path=self.kubelet.path)
        if found is None:
            raise StartError(f'exec: "{command}": executable file not found in $PATH')
        return found

    def _termination_file(self, container: Container) -> Path:
        return self.dir / "termination" / container.name

    def _termination_message(
        self, container: Container, message_file: Path, log_path: Path, offset: int, code: int
    ) -> str:
        try:
            with message_file.open("rb") as f:
                data = f.read(MAX_TERMINATION_MESSAGE_BYTES)
        except OSError:
            data = b""
        if not data and code != 0 and container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with log_path.open("rb") as f:
                f.seek(offset)
                lines = f.read().splitlines(keepends=True)
            data = b"".join(lines[-FALLBACK_LOG_LINES:])[-FALLBACK_LOG_BYTES:]
        return data.decode(errors="replace")

    async def _kill(self, container: Container, grace: float) -> None:
        process = container.process
        if process is None or process.returncode is not None:
            return
        kill_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            kill_group(process.pid, signal.SIGKILL)

    async def _kill_all(self, grace: float) -> None:
        await asyncio.gather(*(self._kill(c, grace) for c in self.all_containers()))

    # ---- environment and volumes ----------------------------------------

    async def _environment(self, container: Container) -> dict[str, str]:
        """The container's variables, in Kubernetes' order: envFrom, then env (which may use earlier ones)."""
        spec = container.spec
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env["HOSTNAME"] = self.pod["spec"].get("hostname") or self.name
        env.update(self.kubelet.service_env)
        for source in spec.get("envFrom", []):
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = await self._config_map(
                    source["configMapRef"]["name"], source["configMapRef"].get("optional", False)
                )
            else:
                data = await self._secret(source["secretRef"]["name"], source["secretRef"].get("optional", False))
            for key, raw in (data or {}).items():
                if is_env_name(prefix + key):
                    env[prefix + key] = raw.decode(errors="replace")
        for var in spec.get("env", []):
            if "valueFrom" in var:
                value = await self._value_from(container, var["valueFrom"])
                if value is not None:
                    env[var["name"]] = value
            else:
                env[var["name"]] = expand(var.get("value", ""), env)
        return env

    async def _value_from(self, container: Container, source: Obj) -> str | None:
        if "fieldRef" in source:
            return field_value(self.pod, source["fieldRef"]["fieldPath"], self.ip, HOST_IP)
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            return resource_value(container.spec, ref["resource"], ref.get("divisor"), NODE_RESOURCES)
        if "configMapKeyRef" in source:
            ref, kind = source["configMapKeyRef"], "ConfigMap"
            data = await self._config_map(ref["name"], ref.get("optional", False))
        else:
            ref, kind = source["secretKeyRef"], "Secret"
            data = await self._secret(ref["name"], ref.get("optional", False))
        if data is None:
            return None
        if ref["key"] not in data:
            if ref.get("optional", False):
                return None
            raise ConfigError(f"couldn't find key {ref['key']} in {kind} {self.namespace}/{ref['name']}")
        return data[ref["key"]].decode(errors="replace")

    async def _config_map(self, name: str, optional: bool) -> dict[str, bytes] | None:
        obj = await self.kubelet.api.get_or_none(f"/api/v1/namespaces/{self.namespace}/configmaps/{name}")
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'configmap "{name}" not found')
        data = {key: value.encode() for key, value in obj.get("data", {}).items()}
        data.update({key: base64.b64decode(value) for key, value in obj.get("binaryData", {}).items()})
        return data

    async def _secret(self, name: str, optional: bool) -> dict[str, bytes] | None:
        obj = await self.kubelet.api.get_or_none(f"/api/v1/namespaces/{self.namespace}/secrets/{name}")
        if obj is None:
            if optional:
                return None
            raise ConfigError(f'secret "{name}" not found')
        return {key: base64.b64decode(value) for key, value in obj.get("data", {}).items()}

    def _mounts(self, container: Container, env: Mapping[str, str]) -> list[tuple[str, Path]]:
        """In-container path -> host path, for every mount and the termination-message file."""
        mounts: list[tuple[str, Path]] = []
        for mount in container.spec.get("volumeMounts", []):
            base = self.volume_paths[mount["name"]]
            sub = mount.get("subPath") or expand(mount.get("subPathExpr", ""), env)
            host = base / sub if sub else base
            if sub and not host.exists():
                host.mkdir(parents=True)
            mounts.append((mount["mountPath"], host))
        message_path = container.spec.get("terminationMessagePath", DEFAULT_TERMINATION_MESSAGE_PATH)
        mounts.append((message_path, self._termination_file(container)))
        return mounts

    async def _prepare_volumes(self) -> bool:
        """Fill every volume's folder, retrying while a source is missing; False if the pod stops."""
        delay = 1.0
        while not self.stop_event.is_set():
            try:
                for volume in self.pod["spec"].get("volumes", []):
                    self.volume_paths[volume["name"]] = await self._prepare_volume(volume)
                return True
            except (ConfigError, ApiError, aiohttp.ClientError, TimeoutError) as e:
                message = f"MountVolume.SetUp failed: {e}"
                log.warning("%s: %s", self.key, message)
                for container in self.all_containers():
                    reason = container.state.get("waiting", {}).get("reason") or "ContainerCreating"
                    container.state = {"waiting": {"reason": reason, "message": message}}
                self._mark()
                if await self._stopped_within(delay):
                    return False
                delay = min(2 * delay, MAX_BACKOFF_SECONDS)
        return False

    async def _prepare_volume(self, volume: Obj) -> Path:
        if "persistentVolumeClaim" in volume:
            # No storage provisioner: a claim is a folder shared by the namespace's
            # pods and kept across them, which is what checkpoint tests need.
            claim: str = volume["persistentVolumeClaim"]["claimName"]
            path = self.kubelet.workdir / "pvc" / self.namespace / claim
            path.mkdir(parents=True, exist_ok=True)
            return path
        name: str = volume["name"]
        path = self.dir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        files: dict[str, tuple[bytes, int]] = {}
        if "configMap" in volume:
            files = await self._source_files(
                volume["configMap"], volume["configMap"].get("defaultMode", DEFAULT_FILE_MODE)
            )
        elif "secret" in volume:
            source = {**volume["secret"], "name": volume["secret"]["secretName"]}
            files = await self._source_files(source, source.get("defaultMode", DEFAULT_FILE_MODE), secret=True)
        elif "downwardAPI" in volume:
            source = volume["downwardAPI"]
            files = self._downward_files(source.get("items", []), source.get("defaultMode", DEFAULT_FILE_MODE))
        elif "projected" in volume:
            files = await self._projected_files(volume["projected"])
        elif "emptyDir" not in volume:
            log.warning("%s: volume %s has an unsupported type; it is an empty folder", self.key, volume["name"])
        for relative, (data, mode) in files.items():
            target = path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(mode)
        return path

    async def _source_files(self, source: Obj, mode: int, *, secret: bool = False) -> dict[str, tuple[bytes, int]]:
        optional = source.get("optional", False)
        data = await (self._secret if secret else self._config_map)(source["name"], optional)
        if data is None:
            return {}
        items = source.get("items")
        if not items:
            return {key: (value, mode) for key, value in data.items()}
        files: dict[str, tuple[bytes, int]] = {}
        for item in items:
            if item["key"] not in data:
                if optional:
                    continue
                raise ConfigError(f"references non-existent key {item['key']} of {source['name']}")
            files[item["path"]] = (data[item["key"]], item.get("mode", mode))
        return files

    def _downward_files(self, items: list[Obj], mode: int) -> dict[str, tuple[bytes, int]]:
        files: dict[str, tuple[bytes, int]] = {}
        for item in items:
            if "fieldRef" in item:
                value = field_value(self.pod, item["fieldRef"]["fieldPath"], self.ip, HOST_IP)
            else:
                ref = item["resourceFieldRef"]
                named = next(c.spec for c in self.all_containers() if c.name == ref["containerName"])
                value = resource_value(named, ref["resource"], ref.get("divisor"), NODE_RESOURCES)
            files[item["path"]] = (value.encode(), item.get("mode", mode))
        return files

    async def _projected_files(self, projected: Obj) -> dict[str, tuple[bytes, int]]:
        mode = projected.get("defaultMode", DEFAULT_FILE_MODE)
        files: dict[str, tuple[bytes, int]] = {}
        for source in projected.get("sources", []):
            if "configMap" in source:
                files.update(await self._source_files(source["configMap"], mode))
            elif "secret" in source:
                files.update(await self._source_files(source["secret"], mode, secret=True))
            elif "downwardAPI" in source:
                files.update(self._downward_files(source["downwardAPI"].get("items", []), mode))
            elif "serviceAccountToken" in source:
                token_source = source["serviceAccountToken"]
                files[token_source["path"]] = (await self._service_account_token(token_source), mode)
            else:
                log.warning("%s: unsupported projected source %s skipped", self.key, sorted(source))
        return files

    async def _service_account_token(self, source: Obj) -> bytes:
        account = self.pod["spec"].get("serviceAccountName") or "default"
        audience = source.get("audience")
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience] if audience else [],
                "expirationSeconds": source.get("expirationSeconds", 3600),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
            },
        }
        result = await self.kubelet.api.request(
            "POST", f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token", body=request
        )
        token: str = result["status"]["token"]
        return token.encode()

    # ---- probes ----------------------------------------------------------

    def _start_probes(self, container: Container) -> list[asyncio.Task[None]]:
        """Start the startup probe, or liveness and readiness right away when there is none."""
        tasks: list[asyncio.Task[None]] = []
        spec = container.spec

        def after_startup() -> None:
            for kind in ("liveness", "readiness"):
                if f"{kind}Probe" in spec:
                    tasks.append(asyncio.create_task(self._probe_loop(container, kind, spec[f"{kind}Probe"], None)))

        if "startupProbe" in spec:
            tasks.append(
                asyncio.create_task(self._probe_loop(container, "startup", spec["startupProbe"], after_startup))
            )
        else:
            after_startup()
        return tasks

    async def _probe_loop(
        self, container: Container, kind: str, probe: Obj, on_started: Callable[[], None] | None
    ) -> None:
        period = float(probe.get("periodSeconds", 10))
        success_threshold = int(probe.get("successThreshold", 1))
        failure_threshold = int(probe.get("failureThreshold", 3))
        await asyncio.sleep(float(probe.get("initialDelaySeconds", 0)))
        successes = failures = 0
        while True:
            ok = await self._probe(container, probe)
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if kind == "readiness":
                if not container.ready and successes >= success_threshold:
                    container.ready = True
                    self._mark()
                elif container.ready and failures >= failure_threshold:
                    container.ready = False
                    self._mark()
            elif kind == "startup" and ok:
                container.started = True
                container.ready = "readinessProbe" not in container.spec
                container.started_event.set()
                self._mark()
                if on_started is not None:
                    on_started()
                return
            elif failures >= failure_threshold:
                log.info("%s: %s probe of %s failed %d times; killing it", self.key, kind, container.name, failures)
                grace = float(probe.get("terminationGracePeriodSeconds", self._grace_period()))
                spawn_task(self._tasks, self._kill(container, grace), f"kill {self.key}/{container.name}")
                return
            await asyncio.sleep(period)

    async def _probe(self, container: Container, probe: Obj) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "httpGet" in probe:
                return await self._http_probe(container, probe["httpGet"], timeout)
            if "tcpSocket" in probe:
                target = probe["tcpSocket"]
                host = target.get("host") or self.ip
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, self._port(container, target["port"])), timeout
                )
                writer.close()
                await writer.wait_closed()
                return True
            if "exec" in probe:
                return await self._exec_probe(container, probe["exec"]["command"], timeout)
        except (OSError, aiohttp.ClientError, TimeoutError, StartError):
            return False
        log.warning("%s: unsupported probe %s counts as passing", self.key, sorted(probe))
        return True

    async def _http_probe(self, container: Container, target: Obj, timeout: float) -> bool:
        scheme = target.get("scheme", "HTTP").lower()
        host = target.get("host") or self.ip
        path = target.get("path", "/")
        url = f"{scheme}://{host}:{self._port(container, target['port'])}{path if path.startswith('/') else '/' + path}"
        headers = {h["name"]: h["value"] for h in target.get("httpHeaders", [])}
        async with self.kubelet.probe_session.get(
            url, headers=headers, ssl=False, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as response:
            return 200 <= response.status < 400

    async def _exec_probe(self, container: Container, command: list[str], timeout: float) -> bool:
        launch = container.launch
        if launch is None:
            return False
        argv = [launch.mapper(arg) for arg in command]
        process = await asyncio.create_subprocess_exec(
            self._resolve(argv[0], launch.cwd),
            *argv[1:],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=launch.env,
            cwd=launch.cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        try:
            return await asyncio.wait_for(process.wait(), timeout) == 0
        finally:
            kill_group(process.pid, signal.SIGKILL)

    @staticmethod
    def _port(container: Container, port: int | str) -> int:
        if isinstance(port, int) or port.isdigit():
            return int(port)
        for declared in container.spec.get("ports", []):
            if declared.get("name") == port:
                return int(declared["containerPort"])
        raise StartError(f"container {container.name} has no port named {port!r}")

    # ---- status ----------------------------------------------------------

    def _mark(self) -> None:
        self._dirty.set()

    async def _publish_loop(self) -> None:
        """Send status whenever it changed; bursts of changes coalesce into one patch."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            if not await self._patch_status():
                await asyncio.sleep(1)
                self._dirty.set()

    async def _flush(self) -> None:
        for _ in range(10):
            if await self._patch_status():
                return
            await asyncio.sleep(0.5)

    async def _patch_status(self) -> bool:
        """Patch the status subresource; False when it is worth retrying."""
        if not self._owns_status:
            return True
        async with self._patch_lock:
            status = self._status()
            if status == self._last_sent:
                return True
            try:
                await self.kubelet.api.request(
                    "PATCH",
                    f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status",
                    body={"metadata": {"uid": self.uid}, "status": status},
                    content_type=STRATEGIC_MERGE_PATCH,
                )
            except ApiError as e:
                if e.status in (404, 409):  # gone, or replaced by a pod of the same name
                    return True
                log.warning("%s: status update failed: %s", self.key, e)
                return e.status != 429 and e.status < 500
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("%s: status update failed: %s", self.key, e)
                return False
            self._last_sent = status
            return True

    def _condition(self, kind: str, ok: bool, reason: str | None = None, message: str | None = None) -> Obj:
        previous = self._transitions.get(kind)
        if previous is None or previous[0] != ok:
            self._transitions[kind] = (ok, now())
        # Explicit nulls: the strategic merge patch merges conditions by type, so
        # an omitted reason would survive from the previous (False) patch.
        return {
            "type": kind,
            "status": "True" if ok else "False",
            "lastTransitionTime": self._transitions[kind][1],
            "reason": None if ok else reason,
            "message": None if ok else message,
        }

    def _status(self) -> Obj:
        terminal = self.phase in TERMINAL_PHASES
        unready = [c.name for c in self.containers if not c.ready]
        containers_ready = not unready and not terminal
        gates = [gate["conditionType"] for gate in self.pod["spec"].get("readinessGates", [])]
        reported = {c["type"]: c.get("status") for c in self.pod.get("status", {}).get("conditions", [])}
        gates_ok = all(reported.get(gate) == "True" for gate in gates)
        not_ready_reason = "PodCompleted" if terminal else "ContainersNotReady"
        not_ready_message = None if terminal else f"containers with unready status: [{' '.join(unready)}]"
        incomplete = [c.name for c in self.init_containers if "terminated" not in c.state and not c.sidecar]
        conditions = [
            self._condition("PodReadyToStartContainers", self.sandbox_ready),
            self._condition("PodScheduled", True),
            self._condition(
                "Initialized",
                self.initialized,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(incomplete)}]",
            ),
            self._condition("ContainersReady", containers_ready, not_ready_reason, not_ready_message),
            self._condition(
                "Ready",
                containers_ready and gates_ok,
                not_ready_reason if not containers_ready else "ReadinessGatesNotReady",
                not_ready_message if not containers_ready else f"not ready: {', '.join(gates)}",
            ),
        ]
        status: Obj = {
            "phase": self.phase,
            "conditions": conditions,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status() for c in self.containers],
            "reason": self.reason,
            "message": self.message,
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        return status


class Kubelet:
    """The node: registration, heartbeats, binding, and one PodWorker per pod bound here."""

    def __init__(self, api: KubeApi, workdir: Path, node_name: str, probe_session: aiohttp.ClientSession) -> None:
        self.api = api
        self.workdir = workdir
        self.pods_dir = workdir / "pods"
        self.node_name = node_name
        self.probe_session = probe_session
        self.path = os.environ.get("PATH", os.defpath)
        server = urlsplit(api.server)
        port = str(server.port or 443)
        # In-cluster clients find the API server through these; the "kubernetes"
        # Service's ClusterIP is not reachable here, the loopback address is.
        self.service_env = {
            "KUBERNETES_SERVICE_HOST": server.hostname or HOST_IP,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{server.hostname}:{port}",
        }
        self.workers: dict[str, PodWorker] = {}
        self._binding: set[str] = set()
        self._used_ips: set[str] = set()
        self._next_ip = 0
        self._ready_since = now()
        self._boot_id = str(uuid.uuid4())
        self._tasks: set[asyncio.Task[Any]] = set()

    # ---- pod IPs ---------------------------------------------------------

    def allocate_ip(self, wanted: str | None) -> str:
        """A loopback address of its own per pod (127.0.X.Y), so pods can share ports."""
        if wanted and wanted.startswith("127.") and wanted != HOST_IP and wanted not in self._used_ips:
            self._used_ips.add(wanted)
            return wanted
        for _ in range(254 * 254):
            n = self._next_ip
            self._next_ip = (n + 1) % (254 * 254)
            ip = f"127.0.{1 + n // 254}.{1 + n % 254}"
            if ip not in self._used_ips:
                self._used_ips.add(ip)
                return ip
        raise RuntimeError("no loopback address left for a pod")

    def release_ip(self, ip: str) -> None:
        self._used_ips.discard(ip)

    # ---- node ------------------------------------------------------------

    def _node_status(self) -> Obj:
        heartbeat = now()

        def condition(kind: str, status: str, reason: str, message: str) -> Obj:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": heartbeat,
                "lastTransitionTime": self._ready_since,
            }

        return {
            "capacity": NODE_RESOURCES,
            "allocatable": NODE_RESOURCES,
            "conditions": [
                condition("Ready", "True", "KubeletReady", "fake kubelet is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "fake kubelet"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "fake kubelet"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "fake kubelet"),
            ],
            "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {
                "machineID": self.node_name,
                "systemUUID": self.node_name,
                "bootID": self._boot_id,
                "kernelVersion": platform.release(),
                "osImage": "kubetune fake kubelet",
                "containerRuntimeVersion": "fake://0",
                "kubeletVersion": "v1.34.4-fake",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    async def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
        }
        try:
            await self.api.request("POST", "/api/v1/nodes", body=node)
            log.info("registered node %s", self.node_name)
        except ApiError as e:
            if e.status != 409:
                raise
        # The TaintNodesByCondition admission plugin taints new nodes not-ready;
        # the node-lifecycle controller that would lift it does not run here.
        await self.api.request(
            "PATCH",
            f"/api/v1/nodes/{self.node_name}",
            body={"spec": {"taints": None}},
            content_type="application/merge-patch+json",
        )

    async def _heartbeat(self) -> None:
        """Keep the Node present and Ready; pod GC deletes pods of nodes that vanish."""
        registered = False
        while True:
            try:
                if not registered:
                    await self._register_node()
                    registered = True
                await self.api.request(
                    "PATCH",
                    f"/api/v1/nodes/{self.node_name}/status",
                    body={"status": self._node_status()},
                    content_type=STRATEGIC_MERGE_PATCH,
                )
            except ApiError as e:
                log.warning("node heartbeat failed: %s", e)
                registered = registered and e.status != 404
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("node heartbeat failed: %s", e)
            await asyncio.sleep(HEARTBEAT_SECONDS if registered else 1.0)

    # ---- pods ------------------------------------------------------------

    async def _watch_pods(self) -> None:
        """List, then watch all pods; relist on 410 Gone, reconnect on errors."""
        resource_version: str | None = None
        while True:
            try:
                if resource_version is None:
                    listing = await self.api.request("GET", "/api/v1/pods", timeout=60)
                    resource_version = listing["metadata"]["resourceVersion"]
                    present = {pod["metadata"]["uid"] for pod in listing["items"]}
                    for pod in listing["items"]:
                        self._dispatch("ADDED", pod)
                    for uid in [uid for uid in self.workers if uid not in present]:
                        self._on_pod_gone(uid)
                async for event in self.api.watch("/api/v1/pods", resource_version):
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise ApiError(obj.get("code", 500), "WATCH", "/api/v1/pods", obj.get("message", ""))
                    resource_version = obj["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._dispatch(event["type"], obj)
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as e:
                if isinstance(e, ApiError) and e.status == 410:
                    log.info("pod watch expired; relisting")
                    resource_version = None
                    continue
                log.warning("pod watch failed (%s); retrying", e)
                await asyncio.sleep(1)

    def _dispatch(self, event: str, pod: Obj) -> None:
        try:
            if event == "DELETED":
                self._on_pod_gone(pod["metadata"]["uid"])
            else:
                self._on_pod(pod)
        except Exception:
            meta = pod.get("metadata", {})
            log.exception("cannot handle pod %s/%s", meta.get("namespace"), meta.get("name"))

    def _on_pod(self, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        node = spec.get("nodeName")
        if not node:
            phase = pod.get("status", {}).get("phase")
            if meta.get("deletionTimestamp") or spec.get("schedulingGates") or phase in TERMINAL_PHASES:
                return
            if uid not in self._binding:
                self._binding.add(uid)
                spawn_task(self._tasks, self._bind(pod), f"bind {meta['namespace']}/{meta['name']}")
            return
        if node != self.node_name:
            return
        worker = self.workers.get(uid)
        if worker is None:
            self.workers[uid] = PodWorker(self, pod)
        else:
            worker.update(pod)

    def _on_pod_gone(self, uid: str) -> None:
        worker = self.workers.pop(uid, None)
        if worker is not None:
            worker.abort()

    async def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        try:
            for attempt in range(5):
                try:
                    await self.api.request(
                        "POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", body=binding
                    )
                    log.info("bound %s/%s", meta["namespace"], meta["name"])
                    return
                except ApiError as e:
                    if e.status in (404, 409):  # gone, or bound meanwhile
                        return
                    log.warning(
                        "binding %s/%s failed (attempt %d): %s", meta["namespace"], meta["name"], attempt + 1, e
                    )
                except (aiohttp.ClientError, TimeoutError) as e:
                    log.warning(
                        "binding %s/%s failed (attempt %d): %s", meta["namespace"], meta["name"], attempt + 1, e
                    )
                await asyncio.sleep(1)
        finally:
            self._binding.discard(meta["uid"])

    # ---- run -------------------------------------------------------------

    def start(self) -> None:
        spawn_task(self._tasks, self._heartbeat(), "node heartbeat")
        spawn_task(self._tasks, self._watch_pods(), "pod watch")

    async def shutdown(self, grace: float = 3.0) -> None:
        """Stop watching, SIGTERM every container, SIGKILL what is left after ``grace``."""
        for task in list(self._tasks):
            task.cancel()
        workers = list(self.workers.values())
        processes = [p for worker in workers for p in worker.processes()]
        for process in processes:
            kill_group(process.pid, signal.SIGTERM)
        if processes:
            await asyncio.wait([asyncio.ensure_future(p.wait()) for p in processes], timeout=grace)
        for worker in workers:
            worker.abort()
        log.info("stopped; killed %d container processes", len(processes))


async def serve(kubeconfig: Path, workdir: Path, node_name: str) -> None:
    """Run the kubelet until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workdir.mkdir(parents=True, exist_ok=True)
    async with (
        KubeApi.from_kubeconfig(kubeconfig) as api,
        aiohttp.ClientSession(headers={"User-Agent": "kube-probe/1.34"}) as probe_session,
    ):
        kubelet = Kubelet(api, workdir.resolve(), node_name, probe_session)
        kubelet.start()
        log.info("fake kubelet %s running; pods in %s", node_name, kubelet.pods_dir)
        await stop.wait()
        await kubelet.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--node-name", default="kubetune-node")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(args.kubeconfig, args.workdir, args.node_name))


if __name__ == "__main__":
    main()
