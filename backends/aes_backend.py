"""The file backend, with every file encrypted at rest by AES-256-GCM.

    FILE_DATA_PATH/<environment>/terraform.tfstate     the state, encrypted
    FILE_DATA_PATH/<environment>/lock.json             the lock while held, encrypted
    FILE_DATA_PATH/<environment>/history/<N>.tfstate   version N of the state: the
                                                       same encrypted file, linked
    FILE_DATA_PATH/<environment>/history/<N>.json      its metadata, encrypted

All the rest is file_backend's: atomic durable writes, the exclusive create
that takes the lock, 0700 directories and 0600 files; this module only
turns the bytes received into a sealed file and back.  It keeps
FILE_DATA_PATH so that a server switched between the two backends fails on
the other's files instead of serving "no state", which Terraform would
take as leave to create everything again.

A file is a 28-byte header and the sealed bytes:

    b'TYLAES\\x00\\x01'   format, version 1
    key id              first 8 bytes of the SHA-256 of the key
    nonce               12 random bytes, new for every write
    ciphertext, tag     AES-256-GCM of the exact bytes received; tag 16 bytes

The associated data is the header, the file's role ('state', 'lock' or
'version', a version's metadata) and the environment's name: a file copied
to another environment, or a lock put in place of the state, does not
decrypt.  Nothing here can notice an older file of the same environment
and role put back, such as a version from history/ copied over the state;
the file permissions must prevent that.

The current key (AES_SECRET_KEY, or AES_KEY_FILE holding the same text)
encrypts every write; retired keys (AES_OLD_KEYS, AES_OLD_KEY_FILES) only
decrypt the files still written with them.  A key is base64 of 32 bytes,
as `openssl rand -base64 32` prints.  Keys are read when an environment is
first used; an error about one names its config key, never the key.

The `cryptography` package is needed (the `aes` extra); without it the
server refuses to start and says what to install.
"""

import base64
import hashlib
import os

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
except ImportError as error:
    raise ImportError("aes_backend needs the 'cryptography' package: "
                      "python3 -m pip install cryptography") from error

from file_backend import FileBackend
from tylstore import TYLPersistent

MAGIC = b'TYLAES\x00\x01'
KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES
MAKE_A_KEY = 'make one with: openssl rand -base64 32'


class DecryptionError(Exception):
    """A stored file that the configured keys do not decrypt.  Its content
    is never returned: not the ciphertext, not a best guess."""


class AESBackend(FileBackend):
    # The state file holds ciphertext: states are read through _load.
    open_tfstate = TYLPersistent.open_tfstate

    def __init__(self, environment, constants, **kwargs):
        super().__init__(environment, constants, **kwargs)
        current, old = _configured_keys(constants)
        self.current_id = key_id(current)
        self.ciphers = {key_id(key): AESGCM(key) for key in old + [current]}

    def _associated_data(self, role, header):
        """What a file must be to decrypt: this header, this role, this environment."""
        return header + role.encode('ascii') + b'\0' + self.environment.encode('utf-8')

    def _dump(self, role, data):
        nonce = os.urandom(NONCE_BYTES)
        header = MAGIC + self.current_id + nonce
        return header + self.ciphers[self.current_id].encrypt(
            nonce, data, self._associated_data(role, header))

    def _load(self, role, path):
        stored = super()._load(role, path)
        if not stored:
            return stored
        header, sealed = stored[:HEADER_BYTES], stored[HEADER_BYTES:]
        if not header.startswith(MAGIC) or len(sealed) < TAG_BYTES:
            raise _undecryptable(path, 'not in aes_backend format')
        wanted, nonce = header[len(MAGIC):-NONCE_BYTES], header[-NONCE_BYTES:]
        cipher = self.ciphers.get(wanted)
        if cipher is None:
            raise _undecryptable(path, 'it names key id %s; configured: %s'
                                 % (wanted.hex(), ', '.join(k.hex() for k in self.ciphers)))
        try:
            return cipher.decrypt(nonce, sealed, self._associated_data(role, header))
        except InvalidTag:
            raise _undecryptable(path, 'key id %s does not authenticate it' % wanted.hex()) from None

    def backend_status(self):
        return dict(super().backend_status(), cipher='AES-256-GCM', key_id=self.current_id.hex())


def key_id(key):
    """The id a file names its key by; for a key file, the first 16 hex
    digits of `base64 -d KEY_FILE | sha256sum`."""
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def _undecryptable(path, detail):
    return DecryptionError('cannot decrypt %s: wrong key or tampered file (%s)' % (path, detail))


def _configured_keys(constants):
    """(current key, [retired keys]) as bytes, from the config."""
    secret, key_file = constants.AES_SECRET_KEY, constants.AES_KEY_FILE
    if (secret is None) == (key_file is None):
        raise ValueError('aes_backend needs exactly one of AES_SECRET_KEY and AES_KEY_FILE, not %s'
                         % ('both' if secret else 'neither'))
    if key_file is None:
        current = _decode_key(secret, 'AES_SECRET_KEY')
    else:
        current = _read_key(key_file, 'AES_KEY_FILE')
    old = [_decode_key(text, 'AES_OLD_KEYS entry %d' % number)
           for number, text in enumerate(constants.AES_OLD_KEYS, 1)]
    old += [_read_key(path, 'AES_OLD_KEY_FILES') for path in constants.AES_OLD_KEY_FILES]
    return current, old


def _decode_key(text, source):
    """The key in base64 `text`; an error names `source`, never the text."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        raise ValueError('%s is not base64; %s' % (source, MAKE_A_KEY)) from None
    if len(key) != KEY_BYTES:
        raise ValueError('%s must be base64 of %d bytes, not of %d; %s'
                         % (source, KEY_BYTES, len(key), MAKE_A_KEY))
    return key


def _read_key(path, source):
    try:
        with open(path, 'rb') as stream:
            text = stream.read()
    except OSError as error:
        raise ValueError('%s: cannot read %s: %s' % (source, path, error.strerror)) from None
    return _decode_key(text, '%s %s' % (source, path))
