"""The routing lab: a market simulator that runs the production routing code on simulated time, baselines, a
hindsight oracle and the what-if report (``esp-routing simulate``). Each module declares its public names in
``__all__``; the package imports none of its modules.

    ``scenario``   ``Scenario``: providers, market events and traffic of one day, read from a TOML file
    ``traffic``    ``arrivals``: the day's emails (time, class, size), deterministic for a seed
    ``market``     ``Market``: the providers answering calls (latency, errors, outages, brown-outs, throttles) and
                   their catalog entries over the day (quota cuts, price changes)
    ``policies``   the production ranking and the baselines (round-robin, static priority, cheapest-first)
    ``engine``     ``simulate``: one policy's day as a discrete-event simulation running the production routing code
    ``oracle``     ``solve``: the hindsight optimum, a linear program over time windows (HiGHS)
    ``results``    what a day measured (``PolicyResult``, ``WindowFigures``) and the oracle found (``OracleResult``)
    ``report``     the comparison table and the self-contained HTML report (plots drawn by ``svg_plots``)
"""
