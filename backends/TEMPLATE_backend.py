"""An example backend to copy when writing your own: it keeps everything in
memory, so a restart loses every state and lock.  It refuses to run unless
config.yaml sets YES_I_KNOW_WHAT_I_AM_DOING.

A real backend keeps the same shape: one instance per environment, the
environment's name in every storage key, no exception handling (an error
must reach Terraform as a 500), and an atomic `set_locked` when several
server processes share the storage.
"""

import logging

from tylstore import TYLHelpers, TYLPersistent

log = logging.getLogger('tyl.template')


class TemplateBackend(TYLPersistent):
    def __init__(self, environment, constants, **kwargs):
        if not getattr(constants, 'YES_I_KNOW_WHAT_I_AM_DOING', False):
            raise RuntimeError('TEMPLATE_backend keeps state only in memory and is an example; '
                               'set YES_I_KNOW_WHAT_I_AM_DOING: true to run it anyway')
        self.environment = environment
        self.constants = constants
        self.tfstate = ''
        self.lock = ''

    def set_locked(self, state_obj, **kwargs):
        if self.lock:
            log.warning('env %s is already locked', self.environment)
            return False
        self.lock = kwargs.get('raw') or state_obj
        return True

    def set_unlocked(self, state_obj, **kwargs):
        # Terraform's force-unlock sends no ID, so an ID cannot be required here.
        if not self.lock:
            log.warning('env %s was not locked', self.environment)
            return False
        self.lock = ''
        return True

    def get_lock_state(self):
        return self.lock

    def store_tfstate(self, tfstate_obj, **kwargs):
        self.tfstate = kwargs.get('raw') or tfstate_obj

    def get_tfstate(self):
        return self.tfstate

    def backend_status(self):
        return {
            'storage': 'memory (lost on restart)',
            'locked': bool(self.lock),
            'has_state': bool(self.tfstate),
            'hosts': TYLHelpers.get_hostnames_from_tfstate(
                self.tfstate, self.constants.HELPER_HOSTNAME_QUERY_MAP),
        }
