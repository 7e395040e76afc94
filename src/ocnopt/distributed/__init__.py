"""Process-group communication of OCNOpt (torch.distributed); the single process is its
trivial case, so the optimizer never calls ``torch.distributed`` itself."""

from ocnopt.distributed.comm import Communicator, assign_work, find_process_group

__all__ = ["Communicator", "assign_work", "find_process_group"]
