"""SIGTERM, SIGHUP and Ctrl-C (SIGINT) as requests to save and stop; a second one aborts at once.

`StopSignals.install()` (main thread only) replaces their handlers. SIGHUP — the terminal or ssh
session of a run started without nohup closed — is a SIGTERM: the run saves and exits 0. The first signal sets
`requested` (the training loop polls it every step, saves the current step and exits); a second
one of either kind ends the process at once, without waiting for the step, a compile or a save
in flight (orbax writes into a temporary directory, so the last finished checkpoint is safe).

Python runs signal handlers only between bytecodes of the main thread, so a handler alone would
wait for the end of a minutes-long XLA compile or step. The signals are also written to a
wake-up pipe (`signal.set_wakeup_fd`) that a daemon thread reads as they arrive: it sets
`requested` at once and aborts on the second signal even while the main thread is inside XLA.

Exit statuses (documented in docs/training.md): a run stopped by SIGTERM exits 0 after its checkpoint
(a preempted job that saved is not a failure), and so does one stopped by SIGHUP; one stopped by Ctrl-C exits 130 after its
checkpoint (128 + SIGINT, what shells expect of an interrupted program); an abort by a second
signal exits 128 + that signal, with no checkpoint.
"""

import logging
import os
import signal
import sys
import threading

_NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C (SIGINT)',
          signal.SIGHUP: 'SIGHUP (terminal closed)'}


class StopSignals:
  """Turns SIGTERM / SIGHUP / SIGINT into a stop request (see the module docstring)."""

  def __init__(self, forward_sigterm_to=None):
    """Args: forward_sigterm_to: when JAX's preemption service owns SIGTERM (multi-process
    runs), Ctrl-C and SIGHUP are passed on as a SIGTERM to this pid so that every process stops at the same
    step; None: handle SIGTERM here too."""
    self.requested = threading.Event()
    self.first_signal = None
    self._forward_to = forward_sigterm_to
    self._count = 0
    self._lock = threading.Lock()
    self._previous = {}
    self._previous_wakeup_fd = None
    self._pipe = None
    self.installed = False

  @property
  def exit_status(self):
    """0 after a SIGTERM or SIGHUP stop, 130 after a Ctrl-C stop, None when no signal came."""
    if self.first_signal is None:
      return None
    return 130 if self.first_signal == signal.SIGINT else 0

  def install(self):
    """Installs the handlers; returns False (and installs nothing) outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
      logging.warning('Stop signals are not handled outside the main thread: SIGTERM or Ctrl-C '
                      'kill the run without a final checkpoint.')
      return False
    signums = [signal.SIGINT, signal.SIGHUP] + ([] if self._forward_to else [signal.SIGTERM])
    for signum in signums:
      self._previous[signum] = signal.signal(signum, self._on_signal)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
      self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # another wake-up fd in use that we must not steal: handlers only
      os.close(read_fd)
      os.close(write_fd)
    else:
      self._pipe = (read_fd, write_fd)
      threading.Thread(target=self._watch, args=(read_fd, set(signums)), daemon=True,
                       name='guidedflow-stop-signals').start()
    self.installed = True
    return True

  def uninstall(self):
    if not self.installed:
      return
    if self._pipe is not None:
      signal.set_wakeup_fd(self._previous_wakeup_fd)
      os.close(self._pipe[1])  # the watcher reads EOF and ends
      self._pipe = None
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}
    self.installed = False

  def _watch(self, read_fd, signums):
    try:
      while True:
        data = os.read(read_fd, 64)
        if not data:
          return
        for signum in data:
          if signum in signums:
            self._record(signum)
    finally:
      os.close(read_fd)

  def _on_signal(self, signum, frame):
    del frame  # Unused.
    if self._pipe is None:  # no watcher thread: count here
      self._record(signum)
      return
    # The watcher counts (and aborts on the second); the flag is also set here so that the
    # main thread sees it at its next bytecode even if the watcher has not run yet.
    with self._lock:
      if self.first_signal is None:
        self.first_signal = signum
    self.requested.set()

  def _record(self, signum):
    with self._lock:
      self._count += 1
      count = self._count
      if count == 1:
        self.first_signal = signum
    if count > 1:
      # Straight to stderr and out: the main thread may be inside XLA for minutes.
      os.write(2, f'error: second stop signal ({_NAMES.get(signum, signum)}): aborted at once, '
                  'no checkpoint of the current step; rerun the same command to resume from '
                  'the last checkpoint.\n'.encode())
      os._exit(128 + signum)
    if signum in (signal.SIGINT, signal.SIGHUP) and self._forward_to:
      os.kill(self._forward_to, signal.SIGTERM)  # JAX's preemption service syncs the step
    self.requested.set()
    logging.warning('%s received: saving a checkpoint at the end of this step, then exiting '
                    '(%s again aborts at once).', _NAMES.get(signum, signum),
                    'Ctrl-C' if signum == signal.SIGINT else signal_name(signum))
    sys.stderr.flush()


def signal_name(signum):
  """'SIGINT' / 'SIGTERM' (the name of `signum`)."""
  return signal.Signals(signum).name


def exit_on_signals(what):
  """Outside training (--mode=sample, evaluate, encode, compile): SIGTERM and SIGHUP end the
  process at once — also inside a long XLA call — with one `error:` line naming `what` and
  status 128 + the signal. Their outputs are written whole or not at all (`atomic`), so the
  files of earlier runs stay as they were. Main thread only; returns False elsewhere."""
  if threading.current_thread() is not threading.main_thread():
    return False
  signums = (signal.SIGTERM, signal.SIGHUP)
  for signum in signums:
    signal.signal(signum, lambda *_: None)  # the watcher below acts; no Python-level work
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

  def watch():
    while True:
      for signum in os.read(read_fd, 64):
        if signum in signums:
          os.write(2, f'error: stopped by {signal_name(signum)} during {what}; the files it '
                      'had not finished were not written (earlier outputs are kept).\n'.encode())
          os._exit(128 + signum)

  threading.Thread(target=watch, daemon=True, name='guidedflow-exit-on-signals').start()
  return True
