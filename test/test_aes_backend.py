"""What aes_backend adds to the conformance suite (test_backends.py, which
runs on it too): nothing readable on disk, key rotation, and one clear
error, never ciphertext, for a file the keys do not decrypt."""

import base64
import os
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, TYLSERVER
from test_backends import L1, L2, SMALL_STATE, TRICKY_STATE, load, lock, lock_body, store_state, unlock

BACKENDS_PATH = os.path.join(ROOT, 'backends')
if BACKENDS_PATH not in sys.path:
    sys.path.insert(0, BACKENDS_PATH)

from aes_backend import HEADER_BYTES, MAGIC, DecryptionError, key_id  # noqa: E402

KEY_A = base64.b64encode(bytes(range(32))).decode('ascii')
KEY_B = base64.b64encode(bytes(range(100, 132))).decode('ascii')
ID_A, ID_B = key_id(base64.b64decode(KEY_A)), key_id(base64.b64decode(KEY_B))
SECRET = 'db-password-hunter2'
SECRET_STATE = ('{"version":4,"serial":1,"lineage":"l","outputs":{"password":{"value":"%s",'
                '"type":"string","sensitive":true}},"resources":[]}' % SECRET).encode('utf-8')
SECRET_LOCK = lock_body('33333333-3333-3333-3333-333333333333', who=SECRET)
UNDECRYPTABLE = 'cannot decrypt %s: wrong key or tampered file'


class AESStore(object):
    """An aes_backend config in `workdir` (data in workdir/data); every
    `configure` rewrites it, as an operator would before a restart."""

    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.config_path = os.path.join(self.workdir, 'config.yaml')

    def configure(self, backend_class='aes_backend.AESBackend', **config):
        config.update(BACKEND_CLASS=backend_class, FILE_DATA_PATH='data')
        with open(self.config_path, 'w') as stream:
            yaml.safe_dump(config, stream)
        self.constants, self.cls = load(self.config_path)
        return self

    def new(self, environment='env'):
        return self.cls(environment, self.constants)

    def path(self, environment='env', name='terraform.tfstate'):
        return os.path.join(self.workdir, 'data', environment, name)

    def read(self, *where):
        with open(self.path(*where), 'rb') as stream:
            return stream.read()

    def write(self, data, *where):
        os.makedirs(os.path.dirname(self.path(*where)), exist_ok=True)
        with open(self.path(*where), 'wb') as stream:
            stream.write(data)

    def write_key(self, name, key):
        """A key file as `openssl rand -base64 32 > name` leaves it."""
        with open(os.path.join(self.workdir, name), 'w') as stream:
            stream.write(key + '\n')


@pytest.fixture
def aes(tmp_path):
    return AESStore(tmp_path).configure(AES_SECRET_KEY=KEY_A)


def undecryptable(path):
    return pytest.raises(DecryptionError, match='^' + UNDECRYPTABLE % path)


def test_files_on_disk_hold_no_plaintext(aes):
    instance = aes.new()
    store_state(instance, SECRET_STATE, holder=SECRET_LOCK.decode('utf-8'))
    assert lock(instance, SECRET_LOCK)
    found = {}
    for directory, _, files in os.walk(os.path.join(aes.workdir, 'data')):
        for name in files:
            with open(os.path.join(directory, name), 'rb') as stream:
                found[os.path.relpath(os.path.join(directory, name), aes.path(name=''))] = stream.read()
    # The state, the lock, and the state's version with its metadata, which
    # names the lock holder (here SECRET): encrypted too.
    assert sorted(found) == ['.flock', 'history/1.json', 'history/1.tfstate', 'lock.json',
                             'terraform.tfstate']
    assert found.pop('.flock') == b''
    assert found['history/1.tfstate'] == found['terraform.tfstate']
    for data in found.values():
        assert data.startswith(MAGIC + ID_A)
        for plain in (SECRET.encode('utf-8'), b'"version"', b'"ID"', b'lineage'):
            assert plain not in data
    assert instance.get_tfstate() == SECRET_STATE
    assert instance.get_lock_state().encode('utf-8') == SECRET_LOCK
    assert instance.list_versions()[0]['who'] == SECRET + '@host'


def test_every_write_has_its_own_nonce(aes):
    instance = aes.new()
    store_state(instance, SMALL_STATE)
    first = aes.read()
    store_state(instance, SMALL_STATE)
    second = aes.read()
    assert first[HEADER_BYTES - 12:HEADER_BYTES] != second[HEADER_BYTES - 12:HEADER_BYTES]
    assert first[HEADER_BYTES:] != second[HEADER_BYTES:]


def rotated_config(aes, how):
    """Key B current and key A retired, in the config or in files
    relative to the config's directory."""
    if how == 'inline':
        return {'AES_SECRET_KEY': KEY_B, 'AES_OLD_KEYS': [KEY_A]}
    aes.write_key('b.key', KEY_B)
    aes.write_key('a.key', KEY_A)
    return {'AES_KEY_FILE': 'b.key', 'AES_OLD_KEY_FILES': ['a.key']}


@pytest.mark.parametrize('how', ['inline', 'files'])
def test_rotation_reads_old_files_and_writes_with_the_new_key(aes, how):
    store_state(aes.new('kept'), TRICKY_STATE)
    store_state(aes.new('left'), SMALL_STATE)
    assert lock(aes.new('kept'), L1)

    aes.configure(**rotated_config(aes, how))
    kept = aes.new('kept')
    assert kept.backend_status()['key_id'] == ID_B.hex()
    assert kept.get_tfstate() == TRICKY_STATE
    assert kept.get_lock_state().encode('utf-8') == L1
    assert unlock(kept, L1)
    store_state(kept, SECRET_STATE)
    assert lock(kept, L2)
    assert aes.read('kept').startswith(MAGIC + ID_B)
    assert aes.read('kept', 'lock.json').startswith(MAGIC + ID_B)
    assert aes.read('left').startswith(MAGIC + ID_A)

    aes.configure(AES_SECRET_KEY=KEY_B)
    kept = aes.new('kept')
    assert kept.get_tfstate() == SECRET_STATE
    assert kept.get_lock_state().encode('utf-8') == L2
    with undecryptable(aes.path('left')) as error:
        aes.new('left').get_tfstate()
    assert 'it names key id %s; configured: %s' % (ID_A.hex(), ID_B.hex()) in str(error.value)


def test_a_wrong_key_is_one_line_500_through_the_server(tyl_factory):
    server = tyl_factory(BACKEND_CLASS='aes_backend.AESBackend', AES_SECRET_KEY=KEY_A).start()
    assert server.request('POST', '/?env=prod', SECRET_STATE)[0] == 200
    assert server.request('LOCK', '/lock?env=prod', SECRET_LOCK)[0] == 200
    server.stop()
    server.config['AES_SECRET_KEY'] = KEY_B
    server.start()
    state_path = os.path.join(server.data_path, 'prod', 'terraform.tfstate')
    with open(state_path, 'rb') as stream:
        stored = stream.read()
    status, _, body = server.request('GET', '/?env=prod')
    assert status == 500
    assert body == ('DecryptionError: %s (it names key id %s; configured: %s)\n' % (
        UNDECRYPTABLE % state_path, ID_A.hex(), ID_B.hex())).encode('utf-8')
    assert SECRET.encode('utf-8') not in body and stored[HEADER_BYTES:][:16] not in body
    status, _, body = server.request('LOCK', '/lock?env=prod', L2)
    assert status == 500 and b'lock.json: wrong key or tampered file' in body
    assert body.count(b'\n') == 1

    server.stop()
    server.config['AES_SECRET_KEY'] = KEY_A
    server.start()
    assert server.request('GET', '/?env=prod')[2] == SECRET_STATE


def test_a_bad_key_is_one_line_500_naming_its_key_never_its_value(tyl_factory):
    short = base64.b64encode(b'sixteen byte key').decode('ascii')
    server = tyl_factory(BACKEND_CLASS='aes_backend.AESBackend', AES_SECRET_KEY=short).start()
    status, _, body = server.request('GET', '/?env=prod')
    assert status == 500
    assert body == (b'ValueError: AES_SECRET_KEY must be base64 of 32 bytes, not of 16; '
                    b'make one with: openssl rand -base64 32\n')


@pytest.mark.parametrize('config, message', [
    ({}, 'exactly one of AES_SECRET_KEY and AES_KEY_FILE, not neither'),
    ({'AES_SECRET_KEY': KEY_A, 'AES_KEY_FILE': 'a.key'},
     'exactly one of AES_SECRET_KEY and AES_KEY_FILE, not both'),
    ({'AES_SECRET_KEY': KEY_A[:-4]}, 'AES_SECRET_KEY must be base64 of 32 bytes, not of 30'),
    ({'AES_SECRET_KEY': KEY_A[:-1]}, 'AES_SECRET_KEY is not base64'),
    ({'AES_SECRET_KEY': KEY_B, 'AES_OLD_KEYS': [KEY_A, base64.b64encode(bytes(64)).decode()]},
     'AES_OLD_KEYS entry 2 must be base64 of 32 bytes, not of 64'),
    ({'AES_KEY_FILE': 'absent.key'}, 'AES_KEY_FILE: cannot read '),
    ({'AES_SECRET_KEY': KEY_B, 'AES_OLD_KEY_FILES': ['short.key']},
     'AES_OLD_KEY_FILES .*short.key must be base64 of 32 bytes, not of 3'),
])
def test_a_bad_key_config_names_the_key(tmp_path, config, message):
    store = AESStore(tmp_path)
    store.write_key('short.key', 'abcd')
    with pytest.raises(ValueError, match=message) as error:
        store.configure(**config).new()
    assert KEY_A not in str(error.value) and KEY_A[:-4] not in str(error.value)


@pytest.mark.parametrize('offset', [0, len(MAGIC), len(MAGIC) + 8, HEADER_BYTES, -1])
def test_a_tampered_byte_is_a_clear_error(aes, offset):
    instance = aes.new()
    store_state(instance, SECRET_STATE)
    assert lock(instance, SECRET_LOCK)
    for name in ('terraform.tfstate', 'lock.json'):
        data = bytearray(aes.read('env', name))
        data[offset] ^= 0x01
        aes.write(bytes(data), 'env', name)
    with undecryptable(aes.path('env', 'terraform.tfstate')):
        instance.get_tfstate()
    with undecryptable(aes.path('env', 'lock.json')):
        instance.get_lock_state()
    with undecryptable(aes.path('env', 'lock.json')):
        unlock(instance, SECRET_LOCK)
    assert os.path.exists(aes.path('env', 'lock.json'))  # still held: nothing moved


@pytest.mark.parametrize('cut', [1, HEADER_BYTES + 15])
def test_a_truncated_file_is_a_clear_error(aes, cut):
    store_state(aes.new(), SECRET_STATE)
    aes.write(aes.read()[:cut])
    with undecryptable(aes.path()):
        aes.new().get_tfstate()


def test_a_file_moved_to_another_environment_or_role_does_not_decrypt(aes):
    one = aes.new('one')
    store_state(one, SECRET_STATE)
    assert lock(one, SECRET_LOCK)
    state, lock_file = aes.read('one'), aes.read('one', 'lock.json')
    aes.write(state, 'two')
    with undecryptable(aes.path('two')):
        aes.new('two').get_tfstate()
    aes.write(state, 'one', 'lock.json')
    with undecryptable(aes.path('one', 'lock.json')):
        one.get_lock_state()
    aes.write(lock_file, 'one')
    with undecryptable(aes.path('one')):
        one.get_tfstate()


def test_a_plain_file_backend_state_is_refused(aes):
    """A server switched from file_backend to aes_backend on the same data
    fails loudly; it never serves the old state, nor "no state"."""
    store_state(aes.configure('file_backend.FileBackend').new(), SECRET_STATE)
    with undecryptable(aes.path()) as error:
        aes.configure(AES_SECRET_KEY=KEY_A).new().get_tfstate()
    assert 'not in aes_backend format' in str(error.value)


def test_without_cryptography_start_up_says_what_to_install(tmp_path):
    blocker = tmp_path / 'blocker' / 'cryptography'
    blocker.mkdir(parents=True)
    (blocker / '__init__.py').write_text('raise ImportError("simulated: not installed")\n')
    config = AESStore(tmp_path).configure(AES_SECRET_KEY=KEY_A).config_path
    environ = {k: v for k, v in os.environ.items() if not k.startswith('TYL_')}

    def check_config(**extra):
        return subprocess.run([sys.executable, TYLSERVER, '--config', config, '--check-config'],
                              capture_output=True, text=True, env=dict(environ, **extra), timeout=30)

    assert check_config().returncode == 0
    blocked = check_config(PYTHONPATH=str(blocker.parent))
    assert blocked.returncode == 2 and blocked.stdout == ''
    assert blocked.stderr == ("tylserver: error: BACKEND_CLASS: cannot load module aes_backend: "
                              "aes_backend needs the 'cryptography' package: "
                              "python3 -m pip install cryptography\n")
