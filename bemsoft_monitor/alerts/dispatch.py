"""The alerts' own thread: once a second it reads what holds (the status board), turns it
into messages (incidents), queues them per channel and sends what is due, each send bounded
by ALERT_TIMEOUT. A channel that is down is logged once, shown on the console and tried
again later with a growing wait; its queue is bounded, so memory stays flat and deliveries
never wait for an alert. After a healthy cycle, at most once a minute, the heartbeat."""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..failures import FailureStore
from ..retry import RetryPolicy
from .channels import Channel, ChannelError, HeartbeatChannel
from .incidents import LABELS, Incidents
from .notices import Notice, render

log = logging.getLogger(__name__)

QUEUE_LIMIT = 20               # messages kept per channel while it is down (the oldest go)
HEARTBEAT_EVERY = 60.0
DISK_CHECK_EVERY = 300.0       # the folders are probed this often (every minute while failing)
CHANNEL_RETRY = RetryPolicy(backoff=30.0, max_backoff=900.0)


@dataclass
class Lane:
    """One channel's queue and health."""
    channel: Channel
    queue: collections.deque = field(default_factory=lambda: collections.deque(maxlen=QUEUE_LIMIT))
    retry_at: float = 0.0
    failures: int = 0
    dropped: int = 0
    last_sent: tuple[float, str] | None = None
    last_error: tuple[float, str] | None = None


@dataclass(frozen=True)
class AlertsView:
    """What the console's "Alertas" panel shows."""
    channels: tuple[tuple[str, str, str], ...]          # name, target (masked), state
    last_sent: tuple[float, str, str] | None            # when, channel, title
    last_error: tuple[float, str, str] | None           # when, channel, error
    open_incidents: tuple[tuple[str, float], ...]       # title, since
    queued: int
    dropped: int


class Alerter:
    TICK = 1.0

    def __init__(self, settings, board, channels: list[Channel], *, replay: str,
                 clock=time.time, host: str | None = None):
        self.settings, self.board, self.clock = settings, board, clock
        self.host = host or socket.gethostname()
        self.incidents = Incidents(settings, replay=replay)
        self.heartbeat = next((c for c in channels if isinstance(c, HeartbeatChannel)), None)
        self.lanes = [Lane(c) for c in channels if not isinstance(c, HeartbeatChannel)]
        self._beat = Lane(self.heartbeat) if self.heartbeat else None
        self._beat_cycle: float | None = None
        self._disk_checked: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the thread
    def start(self) -> "Alerter":
        self._thread = threading.Thread(target=self._run, name="alerts", daemon=True)
        self._thread.start()
        return self

    def stop(self, flush: float = 0.0) -> None:
        """Stop the thread; with `flush`, one last round (a short --once or --drain run ends
        between two ticks) and up to that many seconds for what is queued."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.settings.alert_timeout + 1)
        if flush:
            try:
                self.tick()
            except Exception:  # never in the way of the monitor's exit
                log.exception("Erro inesperado nos alertas ao sair.")
        deadline = time.monotonic() + flush
        while flush and self.queued() and time.monotonic() < deadline:
            if not self.send_due(force=True):
                break

    def _run(self) -> None:
        while not self._stop.wait(self.TICK):
            try:
                self.tick()
            except Exception:  # the alerts must never take the monitor down
                log.exception("Erro inesperado nos alertas; continuam no próximo segundo.")

    # ------------------------------------------------------------------ one round
    def tick(self) -> None:
        """Check the folders when due, turn what holds into messages, send what is due and
        the heartbeat. Tests call this directly."""
        now = self.clock()
        self._check_disk(now)
        cond = self.board.conditions()
        notices = self.incidents.evaluate(cond)
        digest = self.incidents.digest(now, self.board.filed_after(self.incidents.digest_marker))
        daily = self.incidents.daily(now, self.board, cond.started, cond.backlog)
        for notice in notices + [n for n in (digest, daily) if n is not None]:
            self.post(notice)
        self.send_due()
        if self._beat and cond.last_cycle and cond.last_cycle != self._beat_cycle:
            self._heartbeat(now, cond.last_cycle)

    def post(self, notice: Notice) -> None:
        log.log(logging.INFO if notice.state in ("resolvido", "resumo", "teste") else logging.WARNING,
                "Alerta: %s", notice.title)
        message = render(notice, self.settings, self.host)
        with self._lock:
            for lane in self.lanes:
                if len(lane.queue) == lane.queue.maxlen:
                    lane.dropped += 1
                lane.queue.append(message)

    def send_due(self, force: bool = False) -> bool:
        """Send the queued messages of each channel that is not waiting to retry. False
        when some channel failed."""
        ok = True
        for lane in self.lanes:
            while lane.queue and (force or self.clock() >= lane.retry_at) and not (
                    self._stop.is_set() and not force):
                message = lane.queue[0]
                if not self._send(lane, lambda: lane.channel.send(message), message.subject):
                    ok = False
                    break
                with self._lock:
                    if lane.queue and lane.queue[0] is message:
                        lane.queue.popleft()
        return ok

    def _send(self, lane: Lane, send, title: str) -> bool:
        try:
            send()
        except ChannelError as err:
            now = self.clock()
            lane.failures += 1
            delay = CHANNEL_RETRY.delay(lane.failures)
            lane.retry_at = now + delay
            lane.last_error = (now, str(err))
            if lane.failures == 1:  # once per outage of the channel, not per message
                log.warning("Alerta não enviado por %s (%s); nova tentativa em %.0f s. As entregas "
                            "continuam normalmente.", lane.channel.name, err, delay)
            return False
        now = self.clock()
        if lane.failures:
            log.info("Canal de alerta %s voltou a funcionar.", lane.channel.name)
        lane.failures, lane.retry_at, lane.last_sent = 0, 0.0, (now, title)
        if lane.channel is not self.heartbeat:
            log.info("Alerta enviado por %s: %s", lane.channel.name, title)
        return True

    def _heartbeat(self, now: float, cycle: float) -> None:
        lane = self._beat
        due = lane.last_sent is None or now - lane.last_sent[0] >= HEARTBEAT_EVERY
        if due and now >= lane.retry_at:
            self._beat_cycle = cycle
            self._send(lane, lane.channel.send, "heartbeat")

    def _check_disk(self, now: float) -> None:
        """FAILED_DIR and the log folder: can a file be written there now?"""
        failing = self.board.conditions().disk_error is not None
        every = 60.0 if failing else DISK_CHECK_EVERY
        if self._disk_checked is not None and now - self._disk_checked < every:
            return
        self._disk_checked = now
        self.board.disk_error("FAILED_DIR", FailureStore(self.settings.failed_dir).writable())
        if self.settings.log_file:
            self.board.disk_error("LOG_FILE", FailureStore(Path(self.settings.log_file).parent).writable())

    # ------------------------------------------------------------------ read by the console
    def queued(self) -> int:
        with self._lock:
            return sum(len(lane.queue) for lane in self.lanes)

    def view(self) -> AlertsView:
        lanes = self.lanes + ([self._beat] if self._beat else [])
        with self._lock:
            channels = tuple((lane.channel.name, lane.channel.describe(),
                              "com falha" if lane.failures else "ok") for lane in lanes)
            sent = [(lane.last_sent[0], lane.channel.name, lane.last_sent[1])
                    for lane in self.lanes if lane.last_sent]
            errors = [(lane.last_error[0], lane.channel.name, lane.last_error[1])
                      for lane in lanes if lane.last_error]
            return AlertsView(
                channels, max(sent, default=None), max(errors, default=None),
                tuple((LABELS[i.event], i.since or 0.0) for i in self.incidents.open_incidents()),
                sum(len(lane.queue) for lane in self.lanes), sum(lane.dropped for lane in self.lanes))
