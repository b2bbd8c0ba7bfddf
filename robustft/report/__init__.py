"""`robustft-report`: one scorecard (clean, AdvGLUE, attacks, OOD, cost; paired statistics vs a baseline)
from any number of run or sweep directories. collect = reading runs, stats = statistics, render = outputs."""
