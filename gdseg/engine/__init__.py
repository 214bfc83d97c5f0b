"""Training: one trainer (loop + hooks), optimizer and schedules, checkpoints, distributed.

Modules: ``trainer`` (the loop and one iteration), ``hooks`` (teacher update, lr schedule,
evaluation, checkpoints, metrics), ``optim``, ``amp``, ``checkpoint``, ``distributed``,
``launch`` and ``train`` (the command line). Nothing is imported here, so that light modules
(``distributed``, used by ``gdseg.semisup``) do not pull in the model code.
"""
