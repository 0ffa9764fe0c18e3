"""Run a script as a process forked from a server that has imported torch once.

A script's process spends most of a tiny test run importing torch and torchvision (about 8 s
on a slow 2-core machine, where the run itself takes 1-3 s). multiprocessing's forkserver
imports them once per test worker, before any torch op (so no thread pool is copied into a
child), with the one-thread settings of the tests; each run is then a forked child that sets
its argv, cwd and environment, imports the project's modules afresh from the script's folder
(a copied common.py is the one used), runs the script as __main__ and exits with its code. It
is a separate process, as a subprocess is: exit codes, signals, stdout and stderr are its own.
`make` reaches the same children through tests/fastpy (serve() below), torchrun's ranks too
with --no-python. Runs that need other settings at import time (another thread count) stay
real subprocesses (conftest.run_script(env=...) starts one)."""
import io
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import tempfile
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# report.py's plots too: matplotlib and pyplot are 1.5 s of every report run's start; the
# server imports them with the Agg backend (no display toolkit in a process that forks)
PRELOAD = ['torch', 'torchvision', 'numpy', 'PIL.Image', 'matplotlib', 'matplotlib.pyplot']
THREAD_VARS = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS')
_ctx = _threads = None


def context(env):
    """The forkserver context, its server started (once per process) under env: torch reads
    its thread settings when imported there, so every later env must have the same."""
    global _ctx, _threads
    threads = {k: env.get(k) for k in THREAD_VARS}
    if _ctx is not None and threads != _threads:
        raise ValueError(f'forkrun: the server imported torch with {_threads}, not {threads}; '
                         f'start this run as a subprocess')
    if _ctx is None:
        _threads = threads
        ctx = multiprocessing.get_context('forkserver')
        ctx.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in threads.items() if v is not None},
                          MPLBACKEND='Agg')
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _ctx = ctx
    return _ctx


def _child(script, args, cwd, env, out, err):
    """In the forked child: the script's process, as `python script args` would make it.
    out, err: files its stdout and stderr go to (appended), None for /dev/null; err may be
    STDOUT (subprocess's constant), the same file as out."""
    for fd, path in ((1, out), (2, out if err == subprocess.STDOUT else err)):
        f = os.open(path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(f, fd)
        os.close(f)
    _run_as_main(script, args, cwd, env)


def _run_as_main(script, args, cwd, env):
    """Run the script as __main__ on the process's fds 1 and 2, then exit with its code."""
    # unbuffered, as PYTHONUNBUFFERED=1 in the tests' environment: a killed run keeps its lines
    sys.stdout = io.TextIOWrapper(io.FileIO(1, 'w', closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, 'w', closefd=False), write_through=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    here = os.path.dirname(os.path.abspath(script))
    # sys.path as `python script` has it: the script's folder first, not the tests' folders
    # that pytest and conftest put there; the modules beside the script are imported afresh
    sys.path[:] = [here] + [p for p in sys.path if p not in (ROOT, TESTS, here)]
    for name in [n for n, m in sys.modules.items()
                 if n in ('common', '__mp_main__') or _beside(m, here)]:
        del sys.modules[name]
    sys.argv = [script, *args]
    import runpy
    import traceback
    code = interrupted = 0
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:
        traceback.print_exc()
        code, interrupted = 1, isinstance(e, KeyboardInterrupt)
    import atexit
    atexit._run_exitfuncs()  # what the interpreter does at exit: os._exit below skips it
    sys.stdout.flush()
    sys.stderr.flush()
    if interrupted:  # as python does for an uncaught Ctrl-C: it dies by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _beside(module, folder):
    f = getattr(module, '__file__', None)
    return bool(f) and os.path.dirname(os.path.abspath(f)) == folder


def _name(f):
    """A file given as subprocess takes it (an open file, DEVNULL, STDOUT, None) -> a path."""
    if f in (None, subprocess.DEVNULL):
        return None
    return f if f == subprocess.STDOUT else f.name


class Popen:
    """The part of subprocess.Popen the tests use (pid, poll, wait, send_signal, kill,
    returncode), for a script run in a forked child. stdout, stderr: open files, DEVNULL or
    None; stderr may be STDOUT."""

    def __init__(self, script, args, cwd, env, stdout=None, stderr=None, target=None,
                 target_args=()):
        self.args = [sys.executable, script, *[str(a) for a in args]]
        self._proc = context(env).Process(target=target or _child, args=target_args or (
            script, self.args[2:], str(cwd), dict(env), _name(stdout), _name(stderr)))
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self):
        return self._proc.exitcode

    def poll(self):
        return self._proc.exitcode

    def wait(self, timeout=None):
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig):
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)


class Run:
    """A started script run whose output is captured; .wait(timeout) gives what
    subprocess.run(..., capture_output=True, text=True, timeout=...) gives: a CompletedProcess,
    or TimeoutExpired after killing the run."""

    def __init__(self, script, args, cwd, env):
        self._tmp = tempfile.TemporaryDirectory(prefix='forkrun-')
        self._out, self._err = (os.path.join(self._tmp.name, n) for n in ('stdout', 'stderr'))
        with open(self._out, 'w') as out, open(self._err, 'w') as err:
            self._proc = Popen(script, args, cwd, env, out, err)

    def wait(self, timeout):
        p = self._proc
        try:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise subprocess.TimeoutExpired(p.args, timeout, _read(self._out),
                                                _read(self._err))
            return subprocess.CompletedProcess(p.args, p.returncode, _read(self._out),
                                               _read(self._err))
        finally:
            self._tmp.cleanup()


def _read(path):
    with open(path, encoding='utf-8', errors='replace') as f:
        return f.read()


# --------------------------------------------------------------------------- for make
# `make PY=tests/fastpy` runs each `$(PY) script args` of the Makefile through the server
# below: fastpy (standard library only, starts in milliseconds) sends its argv, cwd,
# environment and its stdin, stdout and stderr over a Unix socket; the server forks a
# process for the request, which forks the script's child and reports its pid and then its
# exit status; fastpy forwards SIGINT, SIGTERM and SIGHUP to the child and exits as it did.
def serve(path, env, timeout=120):
    """Start the server on the Unix socket `path`, return once it listens (a Popen: kill it
    when done)."""
    server = Popen(__file__, [], os.path.dirname(path), env, target=_serve, target_args=(path,))
    t0 = time.time()
    while not os.path.exists(path):
        if server.poll() is not None or time.time() - t0 > timeout:
            server.kill()
            raise RuntimeError(f'forkrun: the fork server did not start on {path}')
        time.sleep(0.05)
    return server


def _serve(path):
    import json
    import socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + '.tmp')
    server.listen(16)
    os.replace(path + '.tmp', path)  # the path exists once connections are taken
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the request processes reap themselves
    while True:
        conn, _ = server.accept()
        if os.fork():
            conn.close()
            continue
        server.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # this one waits for its child
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        req = json.loads(msg)
        pid = os.fork()
        if pid == 0:
            conn.close()
            for fd, theirs in enumerate(fds):
                os.dup2(theirs, fd)
                os.close(theirs)
            _run_as_main(req['argv'][0], req['argv'][1:], req['cwd'], req['env'])
        for fd in fds:
            os.close(fd)
        conn.sendall(f'{pid}\n'.encode())
        status = os.waitpid(pid, 0)[1]
        conn.sendall(f'{os.waitstatus_to_exitcode(status)}\n'.encode())
        os._exit(0)
