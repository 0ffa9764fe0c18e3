"""tests/bench_gpu.py (`make bench-gpu`) run with tiny shapes on the CPU, so the GPU benchmark
cannot rot: every row of its table is there with a finite positive value. No timing
thresholds (timings belong to the machine); the targets are judged only on a GPU, which the
table logic is tested for in-process."""
import math
import time
import warnings

import pytest
import torch

import bench_gpu
import common as C
import forkrun
from conftest import script_env, script_path

ROWS = [  # (a piece of the measurement's name, unit), in table order
    ('batched two-view barlow_imagenet augmentation', 'pairs/s'),
    ('bare resnet10 forward+backward', 'img/s'),
    ('synthetic input', 'pairs/s'),
    ('its ratio to bare / 2', 'x'),
    ('its first step (allocation', 's'),
    ('its host waits for the device', 'syncs/step'),
    ('end to end from a 64-image uint8 cache on disk', 'pairs/s'),
    ('its ratio to the synthetic-input step', 'x'),
    ('AdamW), eager', 'img/s'),
    ('its host waits for the device', 'syncs/step'),
    ('test-time augmentation inference', 'img/s'),
    ('its host waits for the device (the copy back at the end)', 'syncs/call'),
    ('probe, one seed of 24 labelled images x 3 views', 's'),
    ('the same with half of them', 's'),
    ('batch 16, --compile', 'pairs/s'),  # the compiled rows last (their cost is the least
    ('its ratio to bare (eager) / 2', 'x'),  # predictable: the budget leaves them out first)
    ('its first step (compilation)', 's'),
    ('AdamW), --compile', 'img/s'),
    ('its first step (compilation)', 's'),
]
COMPILED = {14, 15, 16, 17, 18}  # positions in ROWS of the torch.compile rows


def run_bench(tmp_path, *extra, timeout):
    out = tmp_path / 'bench-gpu.md'
    args = ['--tiny', '--device', 'cpu', '--out', out, *extra]
    r = forkrun.Run(script_path('tests/bench_gpu.py'), args, tmp_path,
                    script_env(tmp_path / 'torch_home')).wait(timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert text in r.stdout  # the same header and table on the screen and in the file
    return text


def table_rows(text):
    """The first markdown table's rows as dicts of its columns."""
    lines = ('\n' + text).split('\n|', 1)[1].split('\n\n', 1)[0]
    lines = ['|' + lines.splitlines()[0]] + lines.splitlines()[1:]
    head = [c.strip() for c in lines[0].strip('|').split('|')]
    assert head == ['measurement', 'value', 'unit', 'peak memory', 'target', 'met?']
    assert set(lines[1]) <= set('|-')
    return [dict(zip(head, (c.strip() for c in line.strip('|').split('|'))))
            for line in lines[2:]]


def number(text):
    return float(text.replace(',', ''))


def check_table(text, compiled):
    for key in ('- device: CPU', '- versions: torch ', 'torchvision ', 'cuDNN ', '- host: ',
                ', /dev/shm ', '- settings: tiny shapes, resnet10, precision fp32'):
        assert key in text
    assert 'targets: not judged for tiny shapes' in text and 'since the process started' in text
    assert '(partial: the run was still going)' not in text  # the last write is the whole
    rows = table_rows(text)
    assert len(rows) == len(ROWS), [r['measurement'] for r in rows]
    for k, (row, (name, unit)) in enumerate(zip(rows, ROWS)):
        assert name in row['measurement'] and row['unit'] == unit, (row, name)
        if k in COMPILED and not compiled:
            assert row['value'] == 'skipped (--skip-compile)', row
            continue
        if unit.startswith('syncs/'):  # counted on CUDA only (test_counting_host_waits)
            assert row['value'] == 'n/a (CPU: no device queue)', row
            continue
        value = number(row['value'])
        assert math.isfinite(value) and value > 0, row
        if row['peak memory']:
            peak = number(row['peak memory'].removesuffix(' GiB'))
            assert math.isfinite(peak) and peak > 0, row
        assert row['met?'] in ('', 'n/a (tiny)'), row
    firsts = [r for r in rows if r['unit'] in ('pairs/s', 'img/s') and r['value'][0].isdigit()]
    assert all(r['peak memory'].endswith(' GiB') for r in firsts)  # each group has its peak
    targets = {r['measurement'].strip(): r['target'] for r in rows if r['target']}
    assert sorted(set(targets.values())) == ['<= 0', '<= 1', '>= 0.9', '>= 2,500',
                                             '>= 20,000']
    # then make paper's cost from the rates measured: the eager fine-tuning step, the
    # test-time row and the end-to-end Barlow Twins step
    cost = text.split("## make paper's cost from these rates\n\n", 1)[1]
    assert cost.startswith('(tiny shapes: the arithmetic only, not what make paper costs)')
    rate = lambda piece: number(next(r['value'] for r in rows if piece in r['measurement']))
    assert (f'fine-tuning {rate("AdamW), eager"):,.0f} img/s at 256 px, test-time inference '
            f'{rate("test-time augmentation"):,.0f} img/s') in ' '.join(cost.split())
    assert f'Barlow Twins {rate("end to end"):,.0f} pairs/s' in ' '.join(cost.split())
    seeds = [number(r['value']) for r in rows
             if 'probe, one seed' in r['measurement'] or 'the same with half' in r['measurement']]
    assert len(seeds) == 2 and ' (all / half the labels) (measured)' in ' '.join(cost.split())
    shown = ' '.join(cost.split()).split('one probe seed ')[1].split(' (all')[0]
    assert [float(v) for v in shown.replace(' s', '').split(' / ')] == \
        pytest.approx(seeds, abs=0.006)  # the table rounds to 0.01, the cost to 3 digits
    assert '| **make paper** |' in cost and '- goal on 1 GPU: 3.00 h;' in cost


def test_tiny_table_on_the_cpu(tmp_path):
    """Every row but the compiled ones (their torch.compile path is the slow test's)."""
    check_table(run_bench(tmp_path, '--skip-compile', '--seconds', '0.1', timeout=180),
                compiled=False)


@pytest.mark.compile
def test_tiny_table_with_compile(tmp_path):
    """The whole table, torch.compile rows included (about 4 minutes on 2 CPU cores with a
    cold inductor cache, about 1 minute with a warm one)."""
    check_table(run_bench(tmp_path, timeout=900), compiled=True)


# --------------------------------------------------------------------------- the table logic
def test_targets_judged_missed_rows_named_and_failures_kept():
    rt = C.setup_runtime('cpu', 'fp32')
    table = bench_gpu.Table(rt, judge=True, budget_s=60)
    table.add('fast', 3000.0, 'pairs/s', 1.5, 2500)
    table.add('slow', 2000.0, 'pairs/s', 1.5, 2500)
    table.add('no target', 5.0, 's')
    table.add('no wait', 0.0, 'syncs/step', target=bench_gpu.AtMost(0))
    table.add('waits', 0.5, 'syncs/step', target=bench_gpu.AtMost(0))

    def boom():
        raise RuntimeError('CUDA out of memory\nmore')
    table.run([('broken', 'img/s', 2500), ('  its ratio', 'x', 0.9)], boom, 1)
    table.run([('too long', 'img/s', 2500)], lambda: [1.0], 3600)
    table.run([('left out', 'img/s', 2500)], lambda: [1.0], 1, skip='skipped (--skip-compile)')
    rows = table_rows('\n'.join(table.markdown()))
    met = {r['measurement']: r['met?'] for r in rows}
    assert met == {'fast': 'yes', 'slow': 'NO', 'no target': '', 'no wait': 'yes',
                   'waits': 'NO', 'broken': 'not measured',
                   'its ratio': 'not measured', 'too long': 'not measured',
                   'left out': 'not measured'}
    value = {r['measurement']: r['value'] for r in rows}
    assert value['fast'] == '3,000' and value['no target'] == '5.00'
    assert {r['target'] for r in rows if r['measurement'] in ('no wait', 'waits')} == {'<= 0'}
    assert value['broken'] == value['its ratio'] == \
        'failed (RuntimeError: CUDA out of memory)'
    assert value['too long'].startswith('skipped (time budget:')
    assert value['left out'] == 'skipped (--skip-compile)'
    assert table.verdict() == ('targets missed: slow; waits. not measured: broken; its '
                               'ratio; too long; left out')
    table.rows = table.rows[:1]
    assert table.verdict() == 'targets: all met'


def test_nvidia_smi_absent_is_said_not_raised(monkeypatch):
    monkeypatch.setattr(bench_gpu, 'NVIDIA_SMI', ['no-such-nvidia-smi-here'])
    assert bench_gpu.nvidia_smi() == '(nvidia-smi unavailable: FileNotFoundError)'


def test_the_cache_it_writes_reads_as_a_cache(tmp_path):
    cache = bench_gpu.write_cache(str(tmp_path), 1100, 8, 3)
    x, y = next(iter(C.make_loader(cache, range(1100), 1100, shuffle=False, workers=0)))
    assert x.shape == (1100, 8, 8, 3) and x.dtype == torch.uint8
    assert 0 <= int(y.min()) and int(y.max()) < 3 and len(cache['ids']) == 1100
    assert x.float().std() > 10  # structured images, not zeros
    assert not (x[256:512] == x[:256]).all()  # distinct up to 1,024, then repeated
    assert (x[1024:] == x[:76]).all()


def test_counting_host_waits(monkeypatch, capsys):
    """count_syncs as on CUDA (the mode switch and the device wait faked): the warnings of
    sync debug mode 'warn' per call, the first one's traceback under 'error' when there are
    more than expected, and the mode back to 'default' whatever happens."""
    modes = []
    monkeypatch.setattr(torch.cuda, 'set_sync_debug_mode', modes.append)
    monkeypatch.setattr(bench_gpu, 'sync', lambda rt: None)
    rt = C.setup_runtime('cpu', 'fp32')
    assert bench_gpu.count_syncs(rt, lambda: None) == 'n/a (CPU: no device queue)'
    rt.device = torch.device('cuda')

    def call(waits):
        def run():
            for _ in range(waits):
                if modes[-1] == 'error':
                    raise RuntimeError(bench_gpu.SYNC_WARNING)
                warnings.warn(bench_gpu.SYNC_WARNING)
            warnings.warn('another warning: not counted')
        return run
    assert bench_gpu.count_syncs(rt, call(0), calls=4) == 0.0
    assert modes == ['warn', 'default'] and capsys.readouterr().out == ''
    modes.clear()
    assert bench_gpu.count_syncs(rt, call(1), calls=2, expected=1) == 1.0  # as expected
    assert modes == ['warn', 'default'] and capsys.readouterr().out == ''
    modes.clear()
    assert bench_gpu.count_syncs(rt, call(3), calls=2) == 3.0
    assert modes == ['warn', 'default', 'error', 'default']
    captured = capsys.readouterr()
    assert '6 synchronizing call(s) in 2 calls; the first one:' in captured.out
    assert f'RuntimeError: {bench_gpu.SYNC_WARNING}' in captured.err  # with its traceback

    def broken():
        raise ValueError('a failed step')
    modes.clear()
    with pytest.raises(ValueError):
        bench_gpu.count_syncs(rt, broken)
    assert modes == ['warn', 'default']


def test_the_table_so_far_is_on_disk_after_every_row(tmp_path):
    """A run stopped from outside (a device time limit) keeps the rows it measured: --out
    is rewritten after each group, marked partial until the end."""
    rt = C.setup_runtime('cpu', 'fp32')
    out = tmp_path / 'bench-gpu.md'
    table = bench_gpu.Table(rt, judge=True, budget_s=60, out=str(out), header=['device: x'])
    table.run([('first', 'img/s', 2500)], lambda: [3000.0], 1)
    text = out.read_text()
    assert text.startswith('# bench-gpu\n\n- device: x\n\n| measurement |')
    assert '| first | 3,000 |' in text and text.endswith('(partial: the run was still going)\n')
    table.run([('second', 'x', 0.9)], lambda: [0.5], 1)
    rows = table_rows(out.read_text())
    assert [(r['measurement'], r['met?']) for r in rows] == [('first', 'yes'), ('second', 'NO')]


def test_a_device_left_failing_skips_the_rows_after(monkeypatch):
    """After a sticky CUDA error, emptying the cache raises too: before, that ended the run in
    the middle of the table."""
    rt = C.setup_runtime('cpu', 'fp32')
    table = bench_gpu.Table(rt, judge=True, budget_s=60)
    table.run([('before', 'img/s', None)], lambda: [1.0], 1)

    def sticky():
        raise RuntimeError('CUDA error: an illegal memory access was encountered')
    monkeypatch.setattr(bench_gpu, 'release', sticky)
    table.run([('when', 'img/s', None), ('  its ratio', 'x', None)], lambda: [2.0, 0.5], 1)
    table.run([('after', 'img/s', None)], lambda: [3.0], 1)
    assert [r['value'] for r in table.rows] == [1.0] + ['skipped (the device failed: '
                                                        'RuntimeError)'] * 3


def test_the_budget_counts_from_the_process_start():
    """since_start includes what ran before bench_gpu was imported (torch's import): the
    budget is the process's, as a device time limit is."""
    before = time.perf_counter() - bench_gpu.IMPORTED
    assert bench_gpu.since_start() >= before > 0
    rt = C.setup_runtime('cpu', 'fp32')
    started = time.perf_counter() - bench_gpu.since_start()  # as main() starts its table
    table = bench_gpu.Table(rt, judge=True, budget_s=bench_gpu.since_start() - 1,
                            started=started)
    table.run([('over budget', 'img/s', None)], lambda: [1.0], 0.5)
    assert table.rows[0]['value'].startswith('skipped (time budget: ')
    table = bench_gpu.Table(rt, judge=True, budget_s=60)  # counted from now
    table.run([('within budget', 'img/s', None)], lambda: [1.0], 0.5)
    assert table.rows[0]['value'] == 1.0
