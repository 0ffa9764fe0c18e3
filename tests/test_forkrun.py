"""forkrun.py, through which the tests run the scripts: a forked run must look like
`python script args` from outside (exit code, stdout, stderr, signals, timeouts) and from
inside (argv, cwd, environment, sys.path, the modules beside the script imported afresh)."""
import os
import signal
import subprocess
import sys
import time

import pytest

import forkrun
from conftest import ROOT, script_env


def write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return str(path)


def test_exit_code_output_argv_cwd_and_environment(tmp_path):
    script = write(tmp_path, 'a.py', '''
import os, sys
print('out', sys.argv[1:], os.getcwd(), os.environ['MARK'], os.environ.get('STRAY'))
print('err line', file=sys.stderr)
sys.exit(3)
''')
    (tmp_path / 'cwd').mkdir()
    env = script_env(tmp_path, MARK='m')
    os.environ['STRAY'] = 'set in the test process, not in env'
    try:
        r = forkrun.Run(script, ['x', 7], tmp_path / 'cwd', env).wait(60)
    finally:
        del os.environ['STRAY']
    assert r.returncode == 3
    assert r.stdout == f"out ['x', '7'] {tmp_path / 'cwd'} m None\n"
    assert r.stderr == 'err line\n'
    assert r.args == [sys.executable, script, 'x', '7']


def test_the_modules_beside_the_script_are_its_own(tmp_path):
    """A script copied with its own common.py imports that one, not the project's; the tests'
    folders are not on its path, the script's folder is first."""
    write(tmp_path, 'common.py', 'MARK = "the copy"\n')
    script = write(tmp_path, 'b.py', '''
import sys
import common
print(common.MARK, common.__file__)
print(sys.path[0])
print([p for p in sys.path if p.rstrip('/').endswith(('/tests', '/main'))])
''')
    env = script_env(tmp_path)
    for _ in range(2):  # and again: nothing of one run stays for the next
        r = forkrun.Run(script, [], tmp_path, env).wait(60)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f'the copy {tmp_path / "common.py"}'
        assert lines[1] == str(tmp_path)
        assert ROOT not in r.stdout.splitlines()[2]


def test_another_thread_count_is_refused(tmp_path):
    forkrun.Run(write(tmp_path, 'z.py', ''), [], tmp_path, script_env(tmp_path)).wait(60)
    with pytest.raises(ValueError, match='as a subprocess'):  # torch has its threads already
        forkrun.context(script_env(tmp_path, OMP_NUM_THREADS='2'))


def test_uncaught_exception_and_string_exit(tmp_path):
    r = forkrun.Run(write(tmp_path, 'c.py', 'raise ValueError("boom")\n'), [], tmp_path,
                    script_env(tmp_path)).wait(60)
    assert r.returncode == 1
    assert 'Traceback' in r.stderr and 'ValueError: boom' in r.stderr
    r = forkrun.Run(write(tmp_path, 'd.py', 'import sys; sys.exit("bad flag")\n'), [],
                    tmp_path, script_env(tmp_path)).wait(60)
    assert (r.returncode, r.stderr) == (1, 'bad flag\n')
    # an uncaught Ctrl-C: python prints the traceback and dies by SIGINT, as here
    script = write(tmp_path, 'k.py', 'import atexit\natexit.register(print, "at exit")\n'
                                     'raise KeyboardInterrupt\n')
    r = forkrun.Run(script, [], tmp_path, script_env(tmp_path)).wait(60)
    real = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=60)
    assert r.returncode == real.returncode == -signal.SIGINT
    assert r.stdout == real.stdout == 'at exit\n' and 'KeyboardInterrupt' in r.stderr


def test_timeout_kills_the_run(tmp_path):
    script = write(tmp_path, 'e.py', 'import time\nprint("started")\ntime.sleep(60)\n')
    run = forkrun.Run(script, [], tmp_path, script_env(tmp_path))
    with pytest.raises(subprocess.TimeoutExpired):
        run.wait(3)
    pid = run._proc.pid
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


def test_popen_signals_and_a_shared_log(tmp_path):
    script = write(tmp_path, 'f.py', '''
import signal, sys, time
print('ready', flush=True)
print('to stderr', file=sys.stderr)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(128 + 15))
time.sleep(60)
''')
    log = tmp_path / 'log.txt'
    with open(log, 'w') as f:
        p = forkrun.Popen(script, [], tmp_path, script_env(tmp_path), f, subprocess.STDOUT)
        t0 = time.time()
        while 'to stderr' not in log.read_text():
            assert p.poll() is None and time.time() - t0 < 60
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 143 == p.returncode
    assert log.read_text() == 'ready\nto stderr\n'
    p = forkrun.Popen(script, [], tmp_path, script_env(tmp_path))
    p.kill()
    assert p.wait(timeout=30) == -signal.SIGKILL


def test_fastpy_runs_a_script_through_the_server(tmp_path, torch_home):
    """`make PY=tests/fastpy`: fastpy's exit status, output and signals are the script's."""
    sock = str(tmp_path / 's.sock')
    server = forkrun.serve(sock, script_env(torch_home))
    try:
        env = script_env(torch_home, FORKRUN_SOCKET=sock, MARK='m')
        fastpy = os.path.join(ROOT, 'tests', 'fastpy')
        script = write(tmp_path, 'g.py', '''
import os, sys
print('out', sys.argv[1:], os.getcwd(), os.environ['MARK'], 'torch' in sys.modules)
print('err', file=sys.stderr)
sys.exit(int(sys.argv[1]))
''')
        r = subprocess.run([fastpy, script, '5'], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (
            5, f"out ['5'] {tmp_path} m True\n", 'err\n')  # torch: imported by the server
        sleeper = write(tmp_path, 'h.py', '''
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print('got it', flush=True), sys.exit(143)))
print('ready', flush=True)
time.sleep(60)
''')
        p = subprocess.Popen([fastpy, sleeper], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline() == 'ready\n'
        p.send_signal(signal.SIGTERM)  # forwarded to the script, whose handler answers
        assert p.wait(timeout=30) == 143 and p.stdout.read() == 'got it\n'
        p = subprocess.Popen([fastpy, write(tmp_path, 'i.py', 'import os, signal\n'
                                            'os.kill(os.getpid(), signal.SIGKILL)\n')],
                             cwd=tmp_path, env=env)
        assert p.wait(timeout=30) == -signal.SIGKILL  # killed, as its parent sees it
    finally:
        server.kill()
        server.wait(timeout=60)
