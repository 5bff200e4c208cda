"""The control plane (DESIGN.md §4): one scheduler per node owns the parameter store and supervises the
node's workers over ZeroMQ; workers run the steps (the data plane stays in torch.distributed).

``zo2 launch`` starts a :class:`~zo2.control.scheduler.Scheduler`; it spawns ``python -m zo2.control.worker``
processes. See zo2/control/README.md.
"""
