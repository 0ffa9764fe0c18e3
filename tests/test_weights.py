"""common.load_backbone on every checkpoint shape it claims to read (fake files in the real
formats, written here), and its refusals. Offline: named weights come from a temporary
$TORCH_HOME, never from the network."""
import os

import pytest
import torch
import torchvision

import common
from common import NAMED_WEIGHTS, UserError, load_backbone, make_backbone


def tv_resnet(arch='resnet18', seed=1):
    """A torchvision ResNet with weights unlike make_backbone's fresh ones (seed, and BN
    statistics made non-trivial), as a full state dict with fc."""
    torch.manual_seed(seed)
    m = getattr(torchvision.models, arch)()
    sd = m.state_dict()
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if k.endswith(('running_mean', 'running_var')):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith('num_batches_tracked'):
            sd[k] = torch.tensor(7)
    return sd


def no_fc(sd):
    return {k: v for k, v in sd.items() if not k.startswith('fc.')}


def assert_loaded(model, sd):
    """Every backbone tensor equals the saved one (the fc of the file is not loaded)."""
    own = model.state_dict()
    assert set(own) == set(no_fc(sd))
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """$TORCH_HOME in tmp; returns the hub checkpoints folder."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'th'))
    assert torch.hub.get_dir() == str(tmp_path / 'th' / 'hub')
    folder = tmp_path / 'th' / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)
    return folder


def test_torchvision_named_weights_from_hub_cache(hub):
    sd = tv_resnet('resnet18')
    name = os.path.basename(NAMED_WEIGHTS['torchvision', 'resnet18'])
    assert name == 'resnet18-f37072fd.pth'
    torch.save(sd, hub / name)
    model, width = make_backbone('resnet18')
    assert width == 512
    src = load_backbone(model, 'resnet18', 'torchvision', offline=True)
    assert src == str(hub / name)
    assert_loaded(model, sd)


def test_barlowtwins_named_weights_facebook_resnet50(hub):
    sd = no_fc(tv_resnet('resnet50', seed=2))  # Facebook's resnet50.pth: no fc
    assert os.path.basename(NAMED_WEIGHTS['barlowtwins', 'resnet50']) == 'resnet50.pth'
    torch.save(sd, hub / 'barlowtwins_resnet50.pth')  # a name of its own in the cache
    model, width = make_backbone('resnet50')
    assert width == 2048
    load_backbone(model, 'resnet50', 'barlowtwins', offline=True)
    assert_loaded(model, sd)


def test_named_weights_missing_offline_says_where_to_put_them(hub):
    model, _ = make_backbone('resnet18')
    with pytest.raises(UserError) as e:
        load_backbone(model, 'resnet18', 'torchvision', offline=True)
    msg = str(e.value)
    assert 'resnet18-f37072fd.pth' in msg and str(hub) in msg
    assert '\n' not in msg
    assert not any(hub.iterdir())  # nothing downloaded, nothing half-written


def test_barlowtwins_named_weights_need_resnet50(hub):
    model, _ = make_backbone('resnet18')
    with pytest.raises(UserError, match='--arch resnet50'):
        load_backbone(model, 'resnet18', 'barlowtwins', offline=True)


def test_facebook_full_checkpoint(tmp_path):
    """Facebook's checkpoint.pth: {'epoch', 'model': DDP BarlowTwins state dict, 'optimizer'}."""
    sd = no_fc(tv_resnet('resnet18', seed=3))
    g = torch.Generator().manual_seed(0)
    model_sd = {f'module.backbone.{k}': v for k, v in sd.items()}
    model_sd.update({'module.projector.0.weight': torch.randn(64, 512, generator=g),
                     'module.projector.1.weight': torch.ones(64),
                     'module.projector.1.bias': torch.zeros(64),
                     'module.projector.3.weight': torch.randn(64, 64, generator=g),
                     'module.bn.running_mean': torch.zeros(64)})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    path = tmp_path / 'checkpoint.pth'
    torch.save({'epoch': 12, 'model': model_sd, 'optimizer': opt.state_dict()}, path)
    model, _ = make_backbone('resnet18')
    load_backbone(model, 'resnet18', str(path))
    assert_loaded(model, sd)


@pytest.mark.parametrize('prefix, wrap', [
    ('module.', None), ('_orig_mod.', None), ('backbone.', None), ('encoder.', None),
    ('_orig_mod.module.', None), ('module.encoder.', 'state_dict'), ('backbone.', 'model')])
def test_prefixed_state_dicts(tmp_path, prefix, wrap):
    sd = tv_resnet('resnet18', seed=4)
    obj = {prefix + k: v for k, v in sd.items()}
    if prefix.endswith(('backbone.', 'encoder.')):  # a whole SSL model: a head next to it
        obj['head.0.weight'] = torch.zeros(8, 512)
    if wrap:  # lightning / solo-learn style: the state dict under a key, next to plain values
        obj = {wrap: obj, 'epoch': 3, 'hparams': {'lr': 0.1}}
    path = tmp_path / 'w.pt'
    torch.save(obj, path)
    model, _ = make_backbone('resnet18')
    load_backbone(model, 'resnet18', str(path))
    assert_loaded(model, sd)


def test_our_own_ckpt_format(tmp_path):
    """ckpt.pt as common.fit writes it: the raw BarlowTwins state dict under 'model'."""
    torch.manual_seed(5)
    backbone, width = make_backbone('resnet18')
    for p in backbone.parameters():  # move away from the fresh init
        p.data.add_(torch.randn_like(p) * 0.1)
    bt = common.BarlowTwins(backbone, width, '32-32')
    opt = common.make_optimizer({'backbone': bt.backbone, 'projector': bt.projector}, 'lars',
                                0.2, 0.0048, 1e-6, 8)
    state = dict(model=bt.state_dict(), optimizer=opt.state_dict(),
                 scaler=torch.amp.GradScaler('cpu', enabled=False).state_dict(), step=3,
                 epoch=0, pos=3, rng_cpu=torch.get_rng_state(),
                 args={'arch': 'resnet18', 'lr': 0.2, 'seeds': [0, 1], 'split': None})
    path = tmp_path / 'ckpt.pt'
    common.torch_save(state, path)
    model, _ = make_backbone('resnet18')
    load_backbone(model, 'resnet18', str(path))
    assert_loaded(model, bt.backbone.state_dict())
    # and our hand-off file, backbone.pt
    path2 = tmp_path / 'backbone.pt'
    common.torch_save(bt.backbone.state_dict(), path2)
    model2, _ = make_backbone('resnet18')
    load_backbone(model2, 'resnet18', str(path2))
    assert_loaded(model2, bt.backbone.state_dict())


def test_old_file_without_num_batches_tracked(tmp_path):
    sd = {k: v for k, v in tv_resnet('resnet18', seed=6).items()
          if not k.endswith('num_batches_tracked')}
    torch.save(sd, tmp_path / 'old.pth')
    model, _ = make_backbone('resnet18')
    load_backbone(model, 'resnet18', str(tmp_path / 'old.pth'))
    for k, v in model.state_dict().items():
        if not k.endswith('num_batches_tracked'):
            assert torch.equal(v, sd[k]), k


# --------------------------------------------------------------------------- refusals
def refused(tmp_path, obj, arch='resnet18', raw=None):
    path = tmp_path / 'bad.pt'
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(obj, path)
    model, _ = make_backbone(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as e:
        load_backbone(model, arch, str(path))
    # a refusal leaves the model as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    msg = str(e.value)
    assert str(path) in msg and '\n' not in msg
    return msg


def test_refuses_resnet18_checkpoint_for_resnet50(tmp_path):
    msg = refused(tmp_path, tv_resnet('resnet18'), arch='resnet50')
    assert '--arch resnet18' in msg


def test_resnet10_and_resnet18_checkpoints_name_each_other(tmp_path):
    """resnet10 (one basic block per stage) and resnet18 share every key of layerN.0: the
    refusal still names the architecture the file is, both ways."""
    r10 = make_backbone('resnet10')[0].state_dict()
    assert '--arch resnet10' in refused(tmp_path, r10, arch='resnet18')
    assert '--arch resnet18' in refused(tmp_path, tv_resnet('resnet18'), arch='resnet10')


def test_refuses_extra_key(tmp_path):
    sd = tv_resnet('resnet18')
    sd['layer1.0.attn.weight'] = torch.zeros(3)
    msg = refused(tmp_path, sd)
    assert 'layer1.0.attn.weight' in msg


def test_refuses_missing_key(tmp_path):
    sd = tv_resnet('resnet18')
    del sd['layer2.0.conv1.weight']
    msg = refused(tmp_path, sd)
    assert 'layer2.0.conv1.weight' in msg


def test_refuses_wrong_shape(tmp_path):
    sd = tv_resnet('resnet18')
    sd['layer4.1.bn2.weight'] = torch.ones(256)
    msg = refused(tmp_path, sd)
    assert 'layer4.1.bn2.weight' in msg


def test_refuses_non_tensor_values(tmp_path):
    msg = refused(tmp_path, {'conv1.weight': [1, 2, 3]})
    assert 'not a state dict' in msg


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_refuses_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / 'pwned'
    sd = no_fc(tv_resnet('resnet18'))
    sd['conv1.weight'] = Payload(marker)
    msg = refused(tmp_path, {'state_dict': sd})
    assert not marker.exists()
    assert 'refused' in msg
    # the payload is live: an unsafe load does run it (so the check above means something)
    live = tmp_path / 'live'
    torch.save(Payload(live), tmp_path / 'live.pt')
    torch.load(tmp_path / 'live.pt', weights_only=False)
    assert live.exists()


def test_pickle_refusal_names_what_was_blocked(tmp_path):
    """The refusal says what the file tried to load (PyTorch's reason), not only PyTorch's
    generic 'Weights only load failed ... Re-running with weights_only=False' preamble."""
    msg = refused(tmp_path, {'x': Payload(tmp_path / 'pwned')})
    assert not (tmp_path / 'pwned').exists()
    assert 'system' in msg, msg
    assert 'weights_only` set to `False' not in msg, msg  # never advise the unsafe load


def test_refuses_truncated_file(tmp_path):
    torch.save(tv_resnet('resnet18'), tmp_path / 'full.pt')
    data = (tmp_path / 'full.pt').read_bytes()
    msg = refused(tmp_path, None, raw=data[:len(data) // 2])
    assert 'not a readable' in msg


@pytest.mark.parametrize('raw', [b'', b'hello, I am a text file\n', bytes(range(256)) * 4],
                         ids=['empty', 'text', 'binary'])
def test_refuses_corrupt_file(tmp_path, raw):
    msg = refused(tmp_path, None, raw=raw)
    assert 'not a readable PyTorch checkpoint' in msg and 'more than tensors' not in msg


def test_garbage_in_a_pickle_is_not_called_unsafe(tmp_path):
    """Bytes the weights-only unpickler stops at (an unknown opcode) are a damaged file,
    not one that holds more than tensors."""
    msg = refused(tmp_path, None, raw=b'\x80\x02garbage bytes')
    assert 'not a readable PyTorch checkpoint' in msg and 'more than tensors' not in msg


def test_missing_file(tmp_path):
    model, _ = make_backbone('resnet18')
    with pytest.raises(UserError, match='no such file'):
        load_backbone(model, 'resnet18', str(tmp_path / 'nope.pt'))


def test_vicreg_named_weights_facebook_resnet50_beside_barlowtwins(hub):
    # Facebook's VICReg resnet50.pth (hubconf.py) is, like Barlow Twins', a torchvision
    # ResNet-50 state dict without fc, under the same file name: in the cache it gets its own
    url = NAMED_WEIGHTS['vicreg', 'resnet50']
    assert url == 'https://dl.fbaipublicfiles.com/vicreg/resnet50.pth'
    vicreg, barlow = no_fc(tv_resnet('resnet50', seed=3)), no_fc(tv_resnet('resnet50', seed=4))
    torch.save(vicreg, hub / 'vicreg_resnet50.pth')
    torch.save(barlow, hub / 'barlowtwins_resnet50.pth')
    model, _ = make_backbone('resnet50')
    assert load_backbone(model, 'resnet50', 'vicreg', offline=True) == str(
        hub / 'vicreg_resnet50.pth')
    assert_loaded(model, vicreg)
    model, _ = make_backbone('resnet50')
    load_backbone(model, 'resnet50', 'barlowtwins', offline=True)
    assert_loaded(model, barlow)


@pytest.mark.parametrize('init', ['vicreg', 'barlowtwins'])
def test_a_resnet50_pth_in_the_cache_is_taken_for_neither(hub, init):
    """torch.hub.load of either Facebook repository saves its weights as resnet50.pth. Before,
    --init barlowtwins loaded whatever was there: VICReg's weights, after a VICReg download."""
    torch.save(no_fc(tv_resnet('resnet50', seed=4)), hub / 'resnet50.pth')
    model, _ = make_backbone('resnet50')
    with pytest.raises(UserError) as e:
        load_backbone(model, 'resnet50', init, offline=True)
    msg = str(e.value)
    assert f'place resnet50.pth from {NAMED_WEIGHTS[init, "resnet50"]}' in msg
    assert str(hub / f'{init}_resnet50.pth') in msg and '\n' not in msg
    assert 'the resnet50.pth there is not used' in msg


def test_vicreg_named_weights_need_resnet50(hub):
    model, _ = make_backbone('resnet18')
    with pytest.raises(UserError, match='--arch resnet50'):
        load_backbone(model, 'resnet18', 'vicreg', offline=True)
