"""The inbox daemon: drops in, jobs run, inputs moved out, and the journal that remembers them.

Owns what a drop is and claiming it (``drops``), the main loop with its watcher, worker pool,
signals and start-up recovery (``service``), running one claimed job of any kind (``jobs``), the
one-at-a-time training lane (``lane``), the SQLite job journal (``journal``), each topic's training
rows and a retrain's union of them with a reviewed file (``topicrows``), systemd's notify
protocol (``notify``), ``fine-tuner status`` (``status``), ``fine-tuner report``: every job's
evaluation side by side over time (``history``), a running job's progress for it
(``progress``), job control from the command line: cancel, retry, promote, retrain (``control``), the
Prometheus metrics derived from the log events (``metrics``) and where the daemon keeps things
(``paths``). The outermost room: it may import every other room and ``daemon.fine_tuner``, but never
``daemon.cli``; nothing outside ``cli`` imports it.
"""
