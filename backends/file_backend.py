"""The embedded default store: one directory per environment on local disk.

    FILE_DATA_PATH/<environment>/terraform.tfstate   the state, as received
    FILE_DATA_PATH/<environment>/lock.json           the lock, while held

Every change is atomic and durable before the server answers (see
`tylstore.write_file_durably`), and taking the lock is an exclusive create,
so two server processes sharing FILE_DATA_PATH exclude each other.
Directories are 0700 and files 0600: state holds secrets.
"""

import os
import uuid

from tylstore import (TYLPersistent, create_file_durably, fsync_path, lock_id,
                      write_file_durably)


class FileBackend(TYLPersistent):
    RAW_BYTES = True

    def __init__(self, environment, constants, **kwargs):
        self.environment = environment
        self.root = constants.FILE_DATA_PATH
        self.directory = os.path.join(self.root, environment)
        self.state_path = os.path.join(self.directory, constants.TFSTATE_FILE_NAME)
        self.lock_path = os.path.join(self.directory, 'lock.json')

    def _in_directory(self, write, path, data):
        """Run `write(path, data)`, creating the environment's directory when
        it is missing: on the first change, never on a read, so a mistyped
        name leaves nothing behind, and without a check on every write."""
        try:
            return write(path, data)
        except FileNotFoundError:
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            try:
                os.mkdir(self.directory, 0o700)
            except FileExistsError:
                pass
            else:
                fsync_path(self.root)
            return write(path, data)

    # Every file goes through these two, `role` naming it ('state' or
    # 'lock'), so a subclass can store another form of the same bytes
    # (aes_backend encrypts them) and reuse all the rest.
    def _dump(self, role, data):
        """The bytes to write for `data`."""
        return data

    def _load(self, role, path):
        """The data in the file `path`, b'' when it does not exist."""
        return _read(path)

    def set_locked(self, state_obj, **kwargs):
        return self._in_directory(create_file_durably, self.lock_path,
                                  self._dump('lock', kwargs['raw_bytes']))

    def set_unlocked(self, state_obj, **kwargs):
        """Remove the lock; with an ID in `state_obj`, only that holder's.

        The lock file is renamed to a name of our own before it is removed,
        so a lock that another process takes meanwhile is never the one
        removed; it is put back if it changed hands since it was read.
        """
        wanted = state_obj.get('ID')
        if wanted and lock_id(self._load('lock', self.lock_path)) != wanted:
            return False
        claimed = '%s.%s.releasing' % (self.lock_path, uuid.uuid4().hex)
        try:
            os.rename(self.lock_path, claimed)
        except FileNotFoundError:
            return False
        if wanted and lock_id(self._load('lock', claimed)) != wanted:
            try:
                os.link(claimed, self.lock_path)
            except FileExistsError:
                pass
            os.unlink(claimed)
            return False
        os.unlink(claimed)
        fsync_path(self.directory)
        return True

    def get_lock_state(self):
        return self._load('lock', self.lock_path).decode('utf-8')

    def store_tfstate(self, tfstate_obj, **kwargs):
        self._in_directory(write_file_durably, self.state_path,
                           self._dump('state', kwargs['raw_bytes']))

    def get_tfstate(self):
        return self._load('state', self.state_path)

    def delete_tfstate(self, **kwargs):
        try:
            os.unlink(self.state_path)
        except FileNotFoundError:
            return
        fsync_path(self.directory)

    def backend_status(self):
        return {
            'directory': self.directory,
            'locked': os.path.exists(self.lock_path),
            'state_bytes': len(_read(self.state_path)),
        }


def _read(path):
    """The file's bytes, or b'' when it does not exist."""
    try:
        with open(path, 'rb') as stream:
            return stream.read()
    except FileNotFoundError:
        return b''
