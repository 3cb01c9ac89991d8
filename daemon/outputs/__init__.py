"""The output folder: ``outputs/<job_id>``, what a job publishes and every later command reads.

Owns the names of the folder's files, each defined once (``names``); the one reader of a published
folder, which never follows a link, reads no file whole past a bounded size and checks every key
it hands out (``folder``: typed accessors for the approach, the base model, the labels, the served
name, the template, the topics, the adapter folder, the model set, the evaluation and the
calibration, and the lenient reading ``status`` and ``report`` list jobs with); and building a
folder under a temporary name, publishing it whole when complete and recording an evaluation in
it (``build``). May import: the top-level base modules (``errors``, ``config``, ``fsutil``,
``portable``, ``logconfig``), ``daemon.data`` and this package; never ``training``, ``serving``,
``quality``, ``fine_tuner``, ``inbox`` or ``cli``.
"""
