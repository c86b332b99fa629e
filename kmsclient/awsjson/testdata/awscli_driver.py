#!/usr/bin/python3
"""Run many awscli commands in one process.

Debian's /usr/bin/aws is `awscli.clidriver.main()`, that is
AWSCLIEntryPoint().main(argv). This runs the same entry point once per
command, so that a test can run dozens of commands without paying Python's
and awscli's start-up each time. Each stdin line is a JSON list (the
arguments after "aws"); each stdout line is the JSON object
{"rc": exit status, "stdout": ..., "stderr": ...}.

Used by TestAWSCLI (clients_test.go).
"""

import json
import os
import sys
import tempfile

import awscli.clidriver


def run(argv):
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            rc = awscli.clidriver.AWSCLIEntryPoint().main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 255
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


for line in sys.stdin:
    print(json.dumps(run(json.loads(line))), flush=True)
