#!/usr/bin/env bash
# Kept for old instructions: the servers `netkv up` starts. See scripts/setup.sh.
exec "$(dirname "$0")/setup.sh" run
