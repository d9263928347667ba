"""A store in a git repository, driven through the `git` command: every
change is one commit and, with GIT_REPOSITORY set, one push.

The layout is PyTerraBackTYL's, so its repositories keep working: one
branch per environment, named after it, holding at its root

    terraform.tfstate          the state, as the exact bytes received
    terraform.tfstate.backup   the state it replaced
    LOCKED                     the lock while held, as the exact bytes received
    state_change.log           GIT_STATE_CHANGE_LOG_FILENAME: a line per lock and
                               unlock, the last GIT_STATE_CHANGE_LOG_SCROLLBACK kept

The history is git's own: each commit that wrote terraform.tfstate is a
version, named by its commit hash, and its message ends with a trailer
line `TYL-Version: {JSON}` holding the version's metadata (serial, lineage,
size, sha256, created, lock_id, who).  Commits without one (PyTerraBackTYL's)
are versions too, with only `created`, their commit time.  Rewriting a
branch would need a forced push, so nothing is ever deleted:
HISTORY_KEEP and HISTORY_KEEP_DAYS only limit the versions listed and
served.

Commits are built with plumbing (hash-object, mktree, commit-tree) in a bare
repository at GIT_WORKING_PATH, with no work tree and no index, so nothing
on disk is ever half-written: a killed server leaves at most an unreferenced
object.  A change becomes visible only when the branch moves, by
compare-and-swap from the commit it was built on:

- without GIT_REPOSITORY the local repository is the storage, and the
  branch moves by `git update-ref <branch> <new> <old>`;
- with GIT_REPOSITORY the remote is the storage and the local repository a
  cache.  Every call first asks the remote where the branch is (ls-remote,
  and a fetch when that commit is not here yet); a change is a plain push,
  never forced, which the remote refuses unless its branch is still at the
  commit the change was built on.  A refused push means another server
  changed the environment first: the cache follows the remote again,
  set_locked returns False and other changes raise GitConflict, so
  history stays linear.

Around each read-modify-commit the backend holds an flock on
tyl-locks/<environment> in the repository, and hands it to the git
processes it starts: servers sharing GIT_WORKING_PATH take turns, even when
one of them is killed while its git is still running.

Durability: git runs with core.fsync=objects,reference and
core.fsyncMethod=fsync (git 2.36 or later), so it fsyncs every object and
ref file it writes.  Git fsyncs no directory, so once the local branch has
moved the backend fsyncs the directories holding the new objects and the
ref.  With a remote, a change is as durable as the remote's acceptance of
the push.  Only a git process that is itself killed with SIGKILL while
moving a ref can leave that ref's .lock file behind; git's error then names
the file, which is safe to remove while no TYL process runs.

No value from a request or from config.yaml reaches git as an option: refs
are passed whole (refs/heads/...), file names only in mktree's input,
messages on stdin, the identity (GIT_USER_NAME, GIT_USER_EMAIL) in
GIT_AUTHOR_* and GIT_COMMITTER_*, and the remote's URL as configuration in
the environment (GIT_CONFIG_COUNT, git 2.31 or later), never in argv.
"""

import contextlib
import fcntl
import json
import os
import re
import subprocess
import time
from collections import defaultdict

from tylstore import (CREATED_FORMAT, ENVIRONMENT_NAME, TYLPersistent, fsync_path, history_cutoff,
                      lock_id)

# PyTerraBackTYL's lock file name (its C.LOCK_STATE_LOCKED) and its words for
# a force-unlock, which carries no lock information.
LOCK_FILE_NAME = 'LOCKED'
FORCE_UNLOCK_TEXT = 'An out-of-process change was made using terraform (e.g. `terraform force-unlock`)'

# The start of the commit message's last line that holds a version's metadata.
VERSION_TRAILER = b'TYL-Version: '

# A version's identifier: a commit hash (SHA-1, or SHA-256 in such a repository).
COMMIT = re.compile(r'[0-9a-f]{40}|[0-9a-f]{64}')

# The directory in the repository holding each environment's flock file.
LOCKS_DIRECTORY = 'tyl-locks'

# Seconds one git command may run: a remote that hangs must not hold the
# environment for ever.
GIT_TIMEOUT = 300

# Variables that would point git elsewhere than GIT_WORKING_PATH.
FOREIGN_VARIABLES = ('GIT_WORK_TREE', 'GIT_COMMON_DIR', 'GIT_INDEX_FILE', 'GIT_OBJECT_DIRECTORY',
                     'GIT_ALTERNATE_OBJECT_DIRECTORIES', 'GIT_NAMESPACE')


class GitError(Exception):
    """A git command failed; the message is git's own."""


class GitConflict(Exception):
    """Another server changed the environment while this change was made."""


class GitBackend(TYLPersistent):
    RAW_BYTES = True

    def __init__(self, environment, constants, **kwargs):
        # The server checks names already; paths and refs are built from
        # them here, so this checks again.
        if not ENVIRONMENT_NAME.fullmatch(environment):
            raise ValueError('invalid environment name %r' % environment)
        self.environment = environment
        self.constants = constants
        self.remote = constants.GIT_REPOSITORY
        self.path = constants.GIT_WORKING_PATH
        self.branch = 'refs/heads/' + _branch_name(environment)
        self.default_branch = _default_branch(constants)
        self.state_name = constants.TFSTATE_FILE_NAME.encode('utf-8')
        self.backup_name = self.state_name + b'.backup'
        self.lock_name = LOCK_FILE_NAME.encode('utf-8')
        self.log_name = constants.GIT_STATE_CHANGE_LOG_FILENAME.encode('utf-8')
        self.lock_path = os.path.join(self.path, LOCKS_DIRECTORY, environment)
        self.environ = _git_environment(constants)
        self.holding = ()
        _create_repository(self.path, self.environ)

    # -- the backend contract ------------------------------------------------

    def set_locked(self, state_obj, **kwargs):
        """Commit the lock file.  False when the lock is held, or when
        another server changed the environment first (its push won)."""
        with self._exclusive():
            tip = self._head()
            files = self._files(tip)
            if self.lock_name in files:
                return False
            line = _fill(self.constants.GIT_STATE_CHANGE_LOG_FORMAT, state_obj) + ' LOCK'
            return self._commit(tip, files, {
                self.lock_name: kwargs['raw_bytes'],
                self.log_name: self._log(files, line),
            }, _fill(self.constants.GIT_COMMIT_MESSAGE_FORMAT, state_obj))

    def set_unlocked(self, state_obj, **kwargs):
        """Remove the lock; with an ID in `state_obj`, only that holder's."""
        wanted = state_obj.get('ID')
        with self._exclusive():
            tip = self._head()
            files = self._files(tip)
            if self.lock_name not in files or (
                    wanted and lock_id(self._content(files, self.lock_name)) != wanted):
                return False
            if state_obj:
                line = _fill(self.constants.GIT_STATE_CHANGE_LOG_FORMAT, state_obj) + ' UNLOCK'
                message = _fill(self.constants.GIT_COMMIT_MESSAGE_FORMAT, state_obj)
            else:
                line = message = FORCE_UNLOCK_TEXT
            changes = {self.lock_name: None, self.log_name: self._log(files, line)}
            if not self._commit(tip, files, changes, message):
                raise self._conflict()
        return True

    def get_lock_state(self):
        with self._exclusive():
            return self._content(self._files(self._head()), self.lock_name).decode('utf-8')

    def store_tfstate(self, tfstate_obj, **kwargs):
        """Commit the state with the lock holder's message, as PyTerraBackTYL did."""
        with self._exclusive():
            tip = self._head()
            files = self._files(tip)
            changes = {self.state_name: kwargs['raw_bytes']}
            if self.state_name in files:
                changes[self.backup_name] = files[self.state_name]
            message = '%s\n\n%s%s' % (self._holder_message(files, 'state written without a lock'),
                                      VERSION_TRAILER.decode('ascii'),
                                      json.dumps(kwargs['metadata']))
            if not self._commit(tip, files, changes, message):
                raise self._conflict()

    def get_tfstate(self):
        with self._exclusive():
            return self._content(self._files(self._head()), self.state_name)

    def list_versions(self):
        """The commits that wrote the state, newest first, from the
        environment's branch back to where it left GIT_DEFAULT_CLONE_BRANCH."""
        keep = self.constants.HISTORY_KEEP
        with self._exclusive():
            tip = self._head()
            if not tip or not keep:
                return []
            base = self._fetched(self.default_branch)
            log = self._git('log', '-z', '--format=%H%n%ct%n%B', '--diff-filter=AM', '-n', str(keep),
                            tip, *(('^' + base,) if base else ()), '--', self.state_name).stdout
        versions = [_version(record) for record in log.split(b'\0') if record]
        cutoff = history_cutoff(self.constants)
        return versions[:1] + [version for version in versions[1:]
                               if not cutoff or version['created'] >= cutoff]

    def get_version(self, version):
        if not COMMIT.fullmatch(version) or \
                version not in [listed['version'] for listed in self.list_versions()]:
            return None
        with self._exclusive():
            return self._git('cat-file', 'blob', b'%s:%s' % (version.encode('ascii'),
                                                             self.state_name)).stdout

    @classmethod
    def list_environments(cls, constants):
        """Every branch but GIT_DEFAULT_CLONE_BRANCH that is an environment's."""
        environ = _git_environment(constants)
        path = constants.GIT_WORKING_PATH
        if constants.GIT_REPOSITORY:
            _create_repository(path, environ)
            listing = _run_git(path, environ, ('ls-remote', '--', 'origin', 'refs/heads/*')).stdout
        elif os.path.isdir(path):
            listing = _run_git(path, environ, ('for-each-ref', '--', 'refs/heads/')).stdout
        else:
            return []
        default = _default_branch(constants)
        environments = []
        for ref in _parse_refs(listing):
            name = ref[len('refs/heads/'):].replace('%2E', '.')
            if ref != default and ENVIRONMENT_NAME.fullmatch(name) and \
                    'refs/heads/' + _branch_name(name) == ref:
                environments.append(name)
        return sorted(environments)

    def delete_tfstate(self, **kwargs):
        """Remove the state; it stays in the history and as the backup."""
        with self._exclusive():
            tip = self._head()
            files = self._files(tip)
            if self.state_name not in files:
                return
            changes = {self.state_name: None, self.backup_name: files[self.state_name]}
            if not self._commit(tip, files, changes,
                                self._holder_message(files, 'state deleted without a lock')):
                raise self._conflict()

    def backend_status(self):
        """The remote's URL is left out: it may hold credentials."""
        with self._exclusive():
            tip = self._head()
            files = self._files(tip)
            state = files.get(self.state_name)
            size = int(self._git('cat-file', '-s', state[2]).stdout) if state else 0
        return {
            'repository': self.path,
            'pushes_to_remote': bool(self.remote),
            'branch': self.branch,
            'commit': tip or '',
            'locked': self.lock_name in files,
            'state_bytes': size,
        }

    # -- git -------------------------------------------------------------------

    def _git(self, *args, input=None, check=True, hold=True):
        """Run `git *args` in the repository and return its CompletedProcess.

        The flock held, if any, is handed to git (`hold`), so that it stays
        held until git is done even if this process is killed meanwhile.
        """
        return _run_git(self.path, self.environ, args, input=input, check=check,
                        pass_fds=self.holding if hold else ())

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold this environment's flock, shared by every server on the repository."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.holding = (fd,)
            yield
        finally:
            self.holding = ()
            os.close(fd)

    def _where(self, ref):
        """The commit `ref` is at in the storage (the remote when there is
        one), or None."""
        if self.remote:
            listing = self._git('ls-remote', '--', 'origin', ref).stdout
        else:
            listing = self._git('for-each-ref', '--', ref).stdout
        return _parse_refs(listing).get(ref)

    def _fetched(self, ref):
        """The commit `ref` is at in the storage, with its objects here;
        a remote's branch is fetched when that commit is new here."""
        tip = self._where(ref)
        if tip and self.remote and self._git('cat-file', '-e', tip, check=False).returncode:
            self._git('fetch', '--quiet', '--no-tags', '--no-write-fetch-head', 'origin',
                      '+%s:%s' % (ref, _tracking(ref)))
        return tip

    def _head(self):
        """The environment's commit; None before its first change."""
        return self._fetched(self.branch)

    def _files(self, commit):
        """{name: (mode, type, object)} of the top of `commit`'s tree."""
        files = {}
        if commit:
            for entry in self._git('ls-tree', '-z', commit).stdout.split(b'\0'):
                if entry:
                    description, name = entry.split(b'\t', 1)
                    files[name] = tuple(description.split(b' '))
        return files

    def _content(self, files, name):
        """The bytes of file `name` of `files`; b'' when there is none."""
        entry = files.get(name)
        return self._git('cat-file', 'blob', entry[2]).stdout if entry else b''

    def _commit(self, tip, files, changes, message):
        """Commit `changes` to the branch at `tip` and publish the commit.

        `changes` maps a file name to its new bytes, to an entry of `files`,
        or to None to remove it.  A new branch starts from
        GIT_DEFAULT_CLONE_BRANCH, when the storage has it, without the
        files of this backend.  Returns False, having changed nothing, when
        the branch moved meanwhile.
        """
        parent, entries = tip, dict(files)
        if not tip:
            parent = self._fetched(self.default_branch)
            entries = {name: entry for name, entry in self._files(parent).items()
                       if name not in (self.state_name, self.backup_name, self.lock_name, self.log_name)}
        written = []
        for name, change in changes.items():
            if change is None:
                entries.pop(name, None)
            elif isinstance(change, bytes):
                written.append(self._git('hash-object', '-w', '--stdin', input=change).stdout.strip())
                entries[name] = (b'100644', b'blob', written[-1])
            else:
                entries[name] = change
        listing = b''.join(b'%s %s %s\t%s\0' % (entry + (name,)) for name, entry in entries.items())
        written.append(self._git('mktree', '-z', input=listing).stdout.strip())
        written.append(self._git('commit-tree', written[-1], *(('-p', parent) if parent else ()),
                                 input=message.encode('utf-8', 'replace')).stdout.strip())
        return self._publish(tip, written[-1].decode('ascii'), written)

    def _publish(self, old, new, written):
        """Move the branch from `old` to `new`: a push to the remote, else a
        compare-and-swap of the local branch.  False when it had moved."""
        if self.remote:
            moved = self._git('push', '--quiet', 'origin', '%s:%s' % (new, self.branch), check=False)
        else:
            moved = self._git('update-ref', self.branch, new, old or '', check=False)
        if moved.returncode:
            now = self._head()  # with a remote, this also fetches the other server's change
            if now == old:
                raise _failure(self.path, 'push' if self.remote else 'update-ref', moved)
            if now != new:  # not our own push, reported lost on its way back
                return False
        if self.remote:
            self._git('update-ref', _tracking(self.branch), new)
        else:
            directories = {os.path.join(self.path, 'objects', name[:2].decode('ascii'))
                           for name in written}
            directories.update([os.path.join(self.path, 'objects'), os.path.dirname(
                os.path.join(self.path, self.branch))])
            for directory in directories:
                if os.path.isdir(directory):  # not when the object was already packed
                    fsync_path(directory)
        # Nothing else packs a local repository; gc --auto returns at once
        # and, when due, packs in the background without our flock.
        self._git('gc', '--auto', '--quiet', hold=False)
        return True

    # -- messages and the change log ------------------------------------------

    def _holder_message(self, files, unlocked):
        """The commit message of a state change: the lock holder's, else `unlocked`."""
        holder = self._content(files, self.lock_name)
        if not holder:
            return unlocked
        try:
            info = json.loads(holder)
        except ValueError:
            info = {}
        return _fill(self.constants.GIT_COMMIT_MESSAGE_FORMAT, info if isinstance(info, dict) else {})

    def _log(self, files, line):
        """The change log with `line` added, keeping the last
        GIT_STATE_CHANGE_LOG_SCROLLBACK lines."""
        lines = self._content(files, self.log_name).splitlines()
        lines.append(' '.join(line.splitlines()).encode('utf-8', 'replace'))
        return b'\n'.join(lines[-self.constants.GIT_STATE_CHANGE_LOG_SCROLLBACK:]) + b'\n'

    def _conflict(self):
        return GitConflict(
            'environment %s was changed by another server while this change was made; '
            'nothing was stored, try again' % self.environment)


def _run_git(path, environ, args, input=None, check=True, pass_fds=()):
    """Run `git *args` in the repository at `path` with `environ`; return
    its CompletedProcess, or raise GitError when it fails and `check`."""
    streams = {'input': input} if input is not None else {'stdin': subprocess.DEVNULL}
    done = subprocess.run(('git',) + tuple(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=environ, cwd=path, timeout=GIT_TIMEOUT, pass_fds=pass_fds, **streams)
    if check and done.returncode:
        raise _failure(path, args[0], done)
    return done


def _failure(path, command, done):
    return GitError('git %s failed in %s: %s' % (
        command, path, ' '.join(done.stderr.decode('utf-8', 'replace').split())))


def _create_repository(path, environ):
    """Create the bare repository at `path` on first use, once even when
    several servers start together (under an flock of its directory)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.isdir(os.path.join(path, LOCKS_DIRECTORY)):
            return
        # --shared=0600: git makes every file 0600 and every directory
        # 0700, for state holds secrets.  --template=: no sample hooks.
        _run_git(path, environ, ('init', '--quiet', '--bare', '--template=', '--shared=0600'))
        os.mkdir(os.path.join(path, LOCKS_DIRECTORY), 0o700)
        for directory in ('objects', 'refs', '', os.pardir):
            fsync_path(os.path.join(path, directory))
    finally:
        os.close(fd)


def _default_branch(constants):
    """The ref of GIT_DEFAULT_CLONE_BRANCH, which PyTerraBackTYL wrote as
    remote/branch, 'origin/master'."""
    default = constants.GIT_DEFAULT_CLONE_BRANCH
    return 'refs/heads/' + (default[len('origin/'):] if default.startswith('origin/') else default)


def _version(record):
    """A version's entry from one record of `git log --format=%H%n%ct%n%B`."""
    commit, seconds, message = record.split(b'\n', 2)
    entry = {'version': commit.decode('ascii'),
             'created': time.strftime(CREATED_FORMAT, time.gmtime(int(seconds)))}
    trailer = message.rstrip(b'\n').rpartition(b'\n')[2]
    if trailer.startswith(VERSION_TRAILER):
        try:
            entry.update(json.loads(trailer[len(VERSION_TRAILER):].decode('utf-8')))
        except ValueError:
            pass  # not ours after all: a message that merely looks like it
    return entry


def _parse_refs(listing):
    """{ref name: commit} from the output of for-each-ref or ls-remote."""
    refs = {}
    for line in listing.splitlines():
        found, name = line.split(b'\t', 1)
        refs[name.decode('utf-8', 'replace')] = found.split()[0].decode('ascii')
    return refs


def _fill(template, info):
    """`template` filled from LockInfo `info`; a field it lacks is ''."""
    return template.format_map(defaultdict(str, info)).replace('\0', '')


def _branch_name(environment):
    """The environment's branch: its own name, unless git refuses that
    ('..', a trailing '.' or '.lock'); then each '.' is written %2E, which
    no environment name contains, so two names never share a branch."""
    if '..' in environment or environment.endswith(('.', '.lock')):
        return environment.replace('.', '%2E')
    return environment


def _tracking(ref):
    """Where the local repository keeps a copy of the remote's `ref`."""
    return 'refs/remotes/origin/' + ref[len('refs/heads/'):]


def _git_environment(constants):
    """The environment of every git command: the repository, the identity,
    and the settings, none of them in argv."""
    settings = [('core.fsync', 'objects,reference'), ('core.fsyncMethod', 'fsync')]
    if constants.GIT_REPOSITORY:
        settings.append(('remote.origin.url', constants.GIT_REPOSITORY))
    environ = {name: value for name, value in os.environ.items() if name not in FOREIGN_VARIABLES}
    environ.update({
        'GIT_DIR': constants.GIT_WORKING_PATH,
        'GIT_TERMINAL_PROMPT': '0',
        'GIT_AUTHOR_NAME': constants.GIT_USER_NAME,
        'GIT_AUTHOR_EMAIL': constants.GIT_USER_EMAIL,
        'GIT_COMMITTER_NAME': constants.GIT_USER_NAME,
        'GIT_COMMITTER_EMAIL': constants.GIT_USER_EMAIL,
        'GIT_CONFIG_COUNT': str(len(settings)),
    })
    for number, (key, value) in enumerate(settings):
        environ['GIT_CONFIG_KEY_%d' % number] = key
        environ['GIT_CONFIG_VALUE_%d' % number] = value
    return environ
