/*
 * shadow-proxy dashboard: polls the admin API (api/report, api/canary) and draws it with the vendored
 * uPlot. No other dependency, no external request. Every value from the API reaches the page through
 * textContent, never as markup: example answers are untrusted text.
 *
 * The admin token (needed for the examples: recorded prompts and answers) is given in the URL fragment,
 * /#token=..., which browsers never send to a server: it is moved to sessionStorage, dropped from the
 * address bar and sent as Authorization: Bearer, never in a query string that lands in access logs.
 *
 * window.shadowDashboard exposes what was drawn (refresh count, points per chart, gates, highlighted
 * differences, the last error) for tests and for debugging from the browser console.
 */
(function () {
  "use strict";

  const params = new URLSearchParams(window.location.search);
  const TOKEN_KEY = "shadow-proxy-admin-token";
  const fragment = new URLSearchParams(window.location.hash.slice(1));
  if (fragment.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  const REFRESH_MS = Math.max(1, Number(params.get("refresh")) || 5) * 1000;
  const ARMS = ["incumbent", "candidate"];
  const QUANTILES = ["p50", "p95", "p99"];
  const COLORS = {
    incumbent: "#2563eb",
    candidate: "#e8590c",
    noise: "#6b7280",
    threshold: "#cf222e",
    axis: "#57606a",
    grid: "#eaeef2",
  };
  const FILL = { incumbent: "rgba(37, 99, 235, 0.16)", candidate: "rgba(232, 89, 12, 0.16)" };
  const DASH = { p50: undefined, p95: [6, 4], p99: [2, 3] };

  const state = {
    refreshes: 0,
    plotted: {},
    gates: [],
    examples: 0,
    highlighted: 0,
    canary: null,
    error: null,
    paused: false,
  };
  window.shadowDashboard = state;

  // ---- small helpers ---------------------------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  /** An element with a class (or attributes) and children; strings become text nodes. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (typeof attrs === "string") {
      node.className = attrs;
    } else if (attrs) {
      for (const [key, value] of Object.entries(attrs)) {
        if (value === undefined || value === null) continue;
        if (key === "class") node.className = value;
        else node.setAttribute(key, value);
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function fill(node, ...children) {
    node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  }

  /** Reads "a.b" as a flat key when present (timeseries points), else as a nested path. */
  function pick(obj, dotted) {
    if (obj === null || obj === undefined) return undefined;
    if (Object.prototype.hasOwnProperty.call(obj, dotted)) return obj[dotted];
    return dotted.split(".").reduce((o, k) => (o === null || o === undefined ? undefined : o[k]), obj);
  }

  function isNum(v) {
    return typeof v === "number" && Number.isFinite(v);
  }

  function orNull(v) {
    return isNum(v) ? v : null;
  }

  function digits(v) {
    const a = Math.abs(v);
    return a >= 100 ? 0 : a >= 10 ? 1 : 2;
  }

  function fmtMs(v) {
    if (!isNum(v)) return "–";
    if (Math.abs(v) >= 1000) return (v / 1000).toFixed(Math.abs(v) >= 10000 ? 1 : 2) + " s";
    return v.toFixed(digits(v)) + " ms";
  }

  /** Tick labels: as many decimals as the step between ticks needs. */
  function ticks(splits, scale, suffix) {
    const step = splits.length > 1 ? Math.abs(splits[1] - splits[0]) / scale : 1;
    let decimals = 0;
    while (decimals < 4 && Math.abs(Math.round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6) decimals++;
    return splits.map((v) => (v === null ? "" : (v / scale).toFixed(decimals) + suffix));
  }

  function msTicks(splits) {
    const max = Math.max(...splits.filter(isNum));
    return max >= 2000 ? ticks(splits, 1000, " s") : ticks(splits, 1, " ms");
  }

  /** Log-scale ticks: short labels ("20 ms", "1.5 s"). */
  function compactMs(v) {
    if (!isNum(v)) return "";
    return v >= 1000 ? Number((v / 1000).toPrecision(2)) + " s" : Number(v.toPrecision(2)) + " ms";
  }

  function fmtWeight(v) {
    return isNum(v) ? Number((v * 100).toFixed(2)) + "%" : "–";
  }

  function fmtPct(v) {
    if (!isNum(v)) return "–";
    return (v * 100).toFixed(Math.abs(v) < 0.1 ? 2 : 1) + "%";
  }

  function fmtCost(v) {
    if (!isNum(v)) return "–";
    return Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(3);
  }

  function fmtInt(v) {
    return isNum(v) ? Math.round(v).toLocaleString("en-US") : "–";
  }

  function clock(ts) {
    return isNum(ts) ? new Date(ts * 1000).toLocaleTimeString("en-GB", { hour12: false }) : "–";
  }

  function ago(ts) {
    if (!isNum(ts)) return "–";
    const s = Math.max(0, Date.now() / 1000 - ts);
    if (s < 90) return Math.round(s) + " s ago";
    if (s < 5400) return Math.round(s / 60) + " min ago";
    if (s < 172800) return (s / 3600).toFixed(1) + " h ago";
    return Math.round(s / 86400) + " d ago";
  }

  function duration(seconds) {
    if (!isNum(seconds)) return "–";
    if (seconds < 120) return Math.round(seconds) + " s";
    if (seconds < 7200) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function pill(outcome) {
    const text = outcome || "unknown";
    return el("span", { class: "pill " + String(text).replace(/[^a-z_]/g, "") }, text.replace("_", " "));
  }

  function swatch(arm) {
    return el("span", "swatch " + arm);
  }

  /** Gate values: a number and a unit suffix, by the gate's unit. */
  function gateNumber(v, unit, signed) {
    if (!isNum(v)) return "–";
    const sign = signed && v > 0 ? "+" : "";
    if (unit === "ms") return sign + v.toFixed(digits(v));
    if (unit === "fraction") return sign + (v * 100).toFixed(2);
    if (unit === "ratio") return v.toFixed(3);
    return sign + Number(v.toPrecision(4)).toString();
  }

  function gateUnit(unit) {
    if (unit === "ms") return " ms";
    if (unit === "fraction") return " pp";
    if (unit === "ratio") return "×";
    return unit ? " " + unit : "";
  }

  // ---- charts ----------------------------------------------------------------------------------

  const charts = {};

  const AXIS = {
    stroke: COLORS.axis,
    grid: { stroke: COLORS.grid, width: 1 },
    ticks: { stroke: COLORS.grid, width: 1 },
  };

  // Windows are whole seconds: no sub-second time ticks.
  const TIME_INCRS = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400, 604800,
  ];

  /** A time x axis and a y axis whose tick labels come from yTicks(splits). */
  function axes(yTicks) {
    return [
      { ...AXIS, incrs: TIME_INCRS },
      { ...AXIS, size: 62, values: (u, splits) => yTicks(splits) },
    ];
  }

  function fromZero(u, min, max) {
    return uPlot.rangeNum(0, max > 0 ? max : 1, 0.1, true);
  }

  function timeX() {
    return { value: (u, v) => (v === null ? "–" : clock(v)) };
  }

  /** Draws data into the chart box, creating the chart on first use; records how many points it has. */
  function draw(id, makeOptions, data) {
    const box = $(id);
    const points = data[0].length;
    box.dataset.points = String(points);
    let chart = charts[id];
    if (!chart) {
      const options = makeOptions();
      options.width = Math.max(240, box.clientWidth);
      options.height = options.height || 220;
      chart = charts[id] = new uPlot(options, data, box);
      let width = options.width;
      new ResizeObserver(() => {
        const next = Math.max(240, box.clientWidth);
        if (next !== width) {
          width = next;
          chart.setSize({ width: next, height: options.height });
        }
      }).observe(box);
    } else {
      chart.setData(data);
    }
    let empty = box.querySelector(".empty");
    if (points === 0 && !empty) {
      box.append(el("div", "empty", "no data in this range yet"));
    } else if (points > 0 && empty) {
      empty.remove();
    }
    return points;
  }

  function latencyChart(series) {
    const x = series.map((p) => p.window);
    const ys = [];
    for (const arm of ARMS) {
      for (const q of QUANTILES) {
        ys.push(series.map((p) => orNull(pick(pick(p, "latency_ms." + arm), q))));
      }
    }
    return draw(
      "chart-latency",
      () => ({
        height: 260,
        scales: { x: { time: true }, y: { range: fromZero } },
        axes: axes(msTicks),
        series: [
          timeX(),
          ...ARMS.flatMap((arm) =>
            QUANTILES.map((q) => ({
              label: arm + " " + q,
              stroke: COLORS[arm],
              width: q === "p50" ? 2 : 1.5,
              dash: DASH[q],
              value: (u, v) => fmtMs(v),
            })),
          ),
        ],
      }),
      [x, ...ys],
    );
  }

  /** Re-bins the DDSketch buckets of both arms into shared logarithmic bins, as shares of each arm. */
  function histogram(distribution) {
    const arms = ARMS.map((arm) => (distribution && Array.isArray(distribution[arm]) ? distribution[arm] : []));
    let lo = Infinity;
    let hi = -Infinity;
    for (const buckets of arms) {
      for (const [value, count] of buckets) {
        if (value > 0 && count > 0) {
          lo = Math.min(lo, value);
          hi = Math.max(hi, value);
        }
      }
    }
    if (!Number.isFinite(lo)) return [[], [], []];
    const bins = 28;
    const logLo = Math.log(lo * 0.97);
    const logHi = Math.log(Math.max(hi, lo * 1.05) * 1.03);
    const step = (logHi - logLo) / bins;
    const edges = Array.from({ length: bins + 1 }, (_, i) => Math.exp(logLo + i * step));
    const shares = arms.map((buckets) => {
      const counts = new Array(bins + 1).fill(0);
      let total = 0;
      for (const [value, count] of buckets) {
        if (!(value > 0) || !(count > 0)) continue;
        const i = Math.min(bins - 1, Math.max(0, Math.floor((Math.log(value) - logLo) / step)));
        counts[i] += count;
        total += count;
      }
      return counts.map((c) => (total ? (100 * c) / total : 0));
    });
    return [edges, ...shares];
  }

  /** A log scale's range widened to whole leading digits (26..71 -> 20..80), where uPlot puts its ticks. */
  function decades(u, min, max) {
    if (!(min > 0) || !(max > 0)) return [1, 10];
    const down = (v) => {
      const mag = Math.pow(10, Math.floor(Math.log10(v)));
      return Math.floor(v / mag) * mag;
    };
    const up = (v) => {
      const mag = Math.pow(10, Math.floor(Math.log10(v)));
      return Math.ceil(v / mag) * mag;
    };
    return [down(min), up(max)];
  }

  /** Keeps the log-scale ticks at least 46 px apart (uPlot's own filter can drop every tick of a decade). */
  function spaced(u, splits) {
    let last = -Infinity;
    return splits.map((v) => {
      const x = u.valToPos(v, "x");
      if (x - last < 46) return null;
      last = x;
      return v;
    });
  }

  function distributionChart(report) {
    const data = histogram(pick(report, "distributions.latency_ms"));
    const points = draw(
      "chart-distribution",
      () => ({
        height: 260,
        scales: { x: { time: false, distr: 3, log: 10, range: decades }, y: { range: fromZero } },
        axes: [
          { ...AXIS, filter: spaced, values: (u, splits) => splits.map(compactMs) },
          { ...AXIS, size: 62, values: (u, splits) => ticks(splits, 1, "%") },
        ],
        series: [
          { label: "from", value: (u, v) => (v === null ? "–" : fmtMs(v)) },
          ...ARMS.map((arm) => ({
            label: arm,
            stroke: COLORS[arm],
            fill: FILL[arm],
            width: 1.5,
            paths: uPlot.paths.stepped({ align: 1 }),
            points: { show: false },
            value: (u, v) => (v === null ? "–" : v.toFixed(1) + "%"),
          })),
        ],
      }),
      data,
    );
    const total = pick(report, "summary.latency_ms.total") || {};
    fill(
      $("distribution-caption"),
      ARMS.map((arm) => {
        const q = total[arm] || {};
        return el(
          "span",
          null,
          swatch(arm),
          `${arm} p50 ${fmtMs(q.p50)} · p95 ${fmtMs(q.p95)} · p99 ${fmtMs(q.p99)} (n=${fmtInt(q.n)})`,
          el("br"),
        );
      }),
    );
    return Math.max(0, points - 1);
  }

  function percentSeries(label, color, extra) {
    return { label, stroke: color, width: 2, value: (u, v) => (v === null ? "–" : v.toFixed(2) + "%"), ...extra };
  }

  function percentAxes() {
    return axes((splits) => ticks(splits, 1, "%"));
  }

  function errorsChart(series, summary) {
    const x = series.map((p) => p.window);
    const ys = ARMS.map((arm) => series.map((p) => percent(pick(p, "error_rate." + arm))));
    const points = draw(
      "chart-errors",
      () => ({
        scales: { x: { time: true }, y: { range: fromZero } },
        axes: percentAxes(),
        series: [timeX(), ...ARMS.map((arm) => percentSeries(arm, COLORS[arm]))],
      }),
      [x, ...ys],
    );
    const errors = (summary && summary.errors) || {};
    fill(
      $("errors-caption"),
      ARMS.map((arm) => {
        const e = errors[arm] || {};
        const classes = Object.entries(e.by_class || {}).map(([k, v]) => `${k} ${v}`);
        return el(
          "span",
          null,
          swatch(arm),
          `${arm} ${fmtPct(e.rate)}`,
          classes.length ? ` (${classes.join(", ")})` : "",
          el("br"),
        );
      }),
      el(
        "span",
        "muted",
        `candidate only ${fmtInt(errors.candidate_only)} · incumbent only ${fmtInt(errors.incumbent_only)} · ` +
          `both ${fmtInt(errors.both)} · status mismatch ${fmtInt(errors.status_mismatch)}`,
      ),
    );
    return points;
  }

  function percent(v) {
    return isNum(v) ? v * 100 : null;
  }

  function divergenceChart(series, summary, gate) {
    const x = series.map((p) => p.window);
    const candidate = series.map((p) => percent(pick(p, "divergence_rate.candidate")));
    const noise = series.map((p) => percent(pick(p, "divergence_rate.noise")));
    const threshold = gate && isNum(gate.threshold) ? gate.threshold * 100 : null;
    const limit = noise.map((n) => (n === null || threshold === null ? null : n + threshold));
    const points = draw(
      "chart-divergence",
      () => ({
        scales: { x: { time: true }, y: { range: fromZero } },
        axes: percentAxes(),
        series: [
          timeX(),
          percentSeries("candidate", COLORS.candidate),
          percentSeries("noise floor (A/A)", COLORS.noise, { dash: [5, 4] }),
          percentSeries("noise + threshold", COLORS.threshold, { width: 1, dash: [2, 3], points: { show: false } }),
        ],
      }),
      [x, candidate, noise, limit],
    );
    const d = (summary && summary.divergence) || {};
    const excess = isNum(d.candidate_rate) && isNum(d.noise_rate) ? d.candidate_rate - d.noise_rate : null;
    const similarity = [
      ["mean similarity", d.mean_similarity],
      ["noise", d.noise_mean_similarity],
      ["text", d.text_similarity_mean],
      ["tokens", d.token_similarity_mean],
      ["embedding cosine", d.embedding_cosine_mean],
      ["label agreement", d.label_agreement],
      ["tool calls", d.tool_call_agreement],
    ]
      .filter(([, v]) => isNum(v))
      .map(([k, v]) => `${k} ${v.toFixed(3)}`);
    fill(
      $("divergence-caption"),
      el(
        "span",
        null,
        swatch("candidate"),
        `candidate ${fmtPct(d.candidate_rate)} of ${fmtInt(d.pairs_compared)} pairs`,
      ),
      el("br"),
      el(
        "span",
        null,
        swatch("noise"),
        d.noise_pairs
          ? `noise floor ${fmtPct(d.noise_rate)} of ${fmtInt(d.noise_pairs)} A/A pairs`
          : "noise floor: no A/A pairs",
      ),
      el("br"),
      el(
        "strong",
        null,
        excess === null ? "excess –" : `excess ${excess >= 0 ? "+" : ""}${(excess * 100).toFixed(2)} pp`,
      ),
      threshold === null ? "" : ` (gate threshold ${threshold.toFixed(1)} pp)`,
      el("br"),
      el("span", "muted", similarity.join(" · ")),
    );
    return points;
  }

  function costChart(series, summary) {
    const x = series.map((p) => p.window);
    const ys = ARMS.map((arm) => series.map((p) => orNull(pick(p, "cost_per_1k." + arm))));
    const points = draw(
      "chart-cost",
      () => ({
        scales: { x: { time: true }, y: { range: fromZero } },
        axes: axes((splits) => ticks(splits, 1, "")),
        series: [
          timeX(),
          ...ARMS.map((arm) => ({ label: arm, stroke: COLORS[arm], width: 2, value: (u, v) => fmtCost(v) })),
        ],
      }),
      [x, ...ys],
    );
    const c = (summary && summary.cost) || {};
    const tokens = c.output_tokens || {};
    const priced = isNum(c.incumbent_per_1k_requests) || isNum(c.candidate_per_1k_requests);
    fill(
      $("cost-caption"),
      priced
        ? [
            ARMS.map((arm) =>
              el("span", null, swatch(arm), `${arm} ${fmtCost(c[arm + "_per_1k_requests"])} per 1k requests`, el("br")),
            ),
            el("strong", null, `ratio ${isNum(c.ratio) ? c.ratio.toFixed(3) + "×" : "–"}`),
            el("br"),
            el(
              "span",
              "muted",
              `output tokens ${fmtInt(tokens.incumbent)} / ${fmtInt(tokens.candidate)}` +
                (isNum(c.estimated_share) && c.estimated_share > 0 ? ` · ${fmtPct(c.estimated_share)} estimated` : ""),
            ),
          ]
        : el("span", "muted", "no prices configured: set [incumbent.price] and [candidate.price]"),
    );
    return points;
  }

  // ---- key figures -----------------------------------------------------------------------------

  function kpi(label, value, ...rest) {
    return el("article", "card kpi", el("span", "label", label), value, ...rest);
  }

  function armRows(format, values) {
    return el(
      "div",
      "arms",
      ARMS.map((arm) => [el("span", null, swatch(arm), arm), el("span", "num", format(values[arm]))]),
    );
  }

  function change(before, after) {
    if (!isNum(before) || !isNum(after) || before === 0) return null;
    const pct = ((after - before) / before) * 100;
    return el("span", pct > 0 ? "up" : "down", `${pct > 0 ? "+" : ""}${pct.toFixed(1)}%`);
  }

  function renderKpis(report) {
    const s = report.summary || {};
    const total = pick(s, "latency_ms.total") || {};
    const p = (arm, q) => pick(total, arm + "." + q);
    const errors = s.errors || {};
    const d = s.divergence || {};
    const cost = s.cost || {};
    fill(
      $("kpis"),
      kpi(
        "pairs",
        el("span", "value", fmtInt(s.pairs)),
        el(
          "span",
          "sub",
          `${fmtInt(s.records)} records · ${fmtInt(s.unpaired)} not mirrored · ${fmtInt(report.pending)} pending`,
        ),
      ),
      kpi(
        "latency p50",
        armRows(fmtMs, { incumbent: p("incumbent", "p50"), candidate: p("candidate", "p50") }),
        el(
          "span",
          "sub",
          "candidate ",
          change(p("incumbent", "p50"), p("candidate", "p50")) || "–",
          ` · p99 ${fmtMs(p("incumbent", "p99"))} → ${fmtMs(p("candidate", "p99"))}`,
        ),
      ),
      kpi(
        "error rate",
        armRows(fmtPct, { incumbent: pick(errors, "incumbent.rate"), candidate: pick(errors, "candidate.rate") }),
        el(
          "span",
          "sub",
          `${fmtInt(errors.candidate_only)} candidate-only · ${fmtInt(errors.incumbent_only)} incumbent-only`,
        ),
      ),
      kpi(
        "divergence",
        el("span", "value", fmtPct(d.candidate_rate)),
        el("span", "sub", `noise floor ${fmtPct(d.noise_rate)} (${fmtInt(d.noise_pairs)} A/A pairs)`),
      ),
      kpi(
        "cost per 1k requests",
        armRows(fmtCost, { incumbent: cost.incumbent_per_1k_requests, candidate: cost.candidate_per_1k_requests }),
        el("span", "sub", isNum(cost.ratio) ? `ratio ${cost.ratio.toFixed(3)}×` : "no prices configured"),
      ),
    );
  }

  // ---- gates -----------------------------------------------------------------------------------

  function needMore(gate) {
    return isNum(gate.need_more_pairs) && gate.need_more_pairs > 0
      ? el("span", "need", `need about ${fmtInt(gate.need_more_pairs)} more pairs`)
      : null;
  }

  function renderGates(report) {
    const gates = pick(report, "verdict.gates") || [];
    state.gates = gates.map((g) => g.name);
    if (!gates.length) {
      fill($("gates-body"), el("tr", null, el("td", { colspan: "7", class: "muted" }, "no gates yet")));
      return;
    }
    fill(
      $("gates-body"),
      gates.map((g) => {
        const interval =
          Array.isArray(g.interval) && g.interval.some(isNum)
            ? `[${gateNumber(g.interval[0], g.unit, false)}, ${gateNumber(g.interval[1], g.unit, false)}]${gateUnit(g.unit)}`
            : "–";
        const estimate = isNum(g.estimate)
          ? gateNumber(g.estimate, g.unit, g.unit !== "ratio") + gateUnit(g.unit)
          : "–";
        const threshold = isNum(g.threshold) ? gateNumber(g.threshold, g.unit, false) + gateUnit(g.unit) : "–";
        return el(
          "tr",
          { "data-gate": g.name, "data-outcome": g.outcome },
          el("td", null, el("span", "gate-name", g.name), el("span", "statistic", g.statistic || "")),
          el("td", null, pill(g.outcome)),
          el("td", "num", estimate),
          el("td", "num", interval),
          el("td", "num", threshold),
          el("td", "num", fmtInt(g.n)),
          el("td", { title: isNum(g.p_value) ? `p = ${g.p_value.toPrecision(3)}` : null }, g.rule || "", needMore(g)),
        );
      }),
    );
  }

  // ---- canary ----------------------------------------------------------------------------------

  function renderCanary(result) {
    const body = $("canary-body");
    body.classList.remove("muted");
    if (result.status === 404) {
      state.canary = "none";
      const message = String(pick(result.body, "error.message") || "not available").replace(/:\s*no canary$/i, "");
      fill(body, el("p", "muted", "No canary: " + message + "."));
      return;
    }
    if (result.status !== 200 || !result.body) {
      state.canary = "unavailable";
      fill(
        body,
        el(
          "p",
          "muted",
          "Canary state unavailable: " + (pick(result.body, "error.message") || `HTTP ${result.status}`),
        ),
      );
      return;
    }
    const c = result.body;
    const s = c.state || {};
    const stages = Array.isArray(c.stages) ? c.stages : [];
    const enabled = c.enabled !== false;
    state.canary = s.status || "unknown";
    const evidence = c.evidence || {};
    // Only the gates the current stage decides on (evidence carries every gate).
    const decisive = c.stage && Array.isArray(c.stage.gates) ? new Set(c.stage.gates) : null;
    const stageGates = Object.entries(evidence.gates || {}).filter(
      ([name, g]) => g && g.outcome !== "skipped" && (!decisive || decisive.has(name)),
    );
    const history = Array.isArray(c.history) ? c.history.slice(0, 3) : [];
    fill(
      body,
      el(
        "div",
        null,
        pill(enabled ? s.status : "shadow only"),
        " ",
        el("span", "muted small", enabled ? "" : "canary.enabled = false"),
      ),
      el("div", "weight", fmtWeight(s.weight)),
      el("div", "muted small", "of users served by the candidate"),
      stages.length
        ? el(
            "div",
            { class: "ladder", title: "stage weights" },
            stages.map((st, i) =>
              el("span", i < s.stage ? "done" : i === s.stage ? "current" : "", fmtWeight(st.weight)),
            ),
          )
        : null,
      el(
        "dl",
        null,
        el("dt", null, "stage"),
        el("dd", { id: "canary-stage" }, `${isNum(s.stage) ? s.stage + 1 : "–"} of ${stages.length || "–"}`),
        el("dt", null, "started"),
        el("dd", null, `${ago(s.stage_started)} (${clock(s.stage_started)})`),
        el("dt", null, "needs"),
        el("dd", null, c.stage ? `${duration(c.stage.min_duration)} and ${fmtInt(c.stage.min_pairs)} pairs` : "–"),
        el("dt", null, "pairs"),
        el("dd", null, fmtInt(evidence.pairs)),
        el("dt", null, "controller"),
        el("dd", null, c.lease_holder || "no lease holder"),
      ),
      stageGates.length ? el("h3", null, "this stage's gates") : null,
      stageGates.length
        ? el(
            "div",
            "stage-gates",
            stageGates.map(([name, g]) => [
              el("code", null, name),
              pill(g.outcome),
              isNum(g.need_more_pairs) && g.need_more_pairs > 0
                ? el("span", "muted need", `need about ${fmtInt(g.need_more_pairs)} more pairs`)
                : null,
            ]),
          )
        : null,
      history.length ? el("h3", null, "latest events") : null,
      history.length
        ? el(
            "ul",
            "small",
            history.map((e) =>
              el("li", null, `${clock(e.time)} ${e.action || ""} by ${e.actor || "?"}: ${e.reason || ""}`),
            ),
          )
        : null,
    );
  }

  // ---- examples and the word diff --------------------------------------------------------------

  function tokens(text) {
    return text.match(/\s+|[\p{L}\p{N}_]+|[^\s\p{L}\p{N}_]/gu) || [];
  }

  /** Word-level diff: marks, per side, the tokens outside a longest common subsequence. */
  function diff(a, b) {
    const keepA = new Array(a.length).fill(false);
    const keepB = new Array(b.length).fill(false);
    let start = 0;
    while (start < a.length && start < b.length && a[start] === b[start]) {
      keepA[start] = keepB[start] = true;
      start++;
    }
    let endA = a.length;
    let endB = b.length;
    while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) {
      endA--;
      endB--;
      keepA[endA] = keepB[endB] = true;
    }
    const n = endA - start;
    const m = endB - start;
    if (n > 0 && m > 0 && n * m <= 4000000) {
      // lcs[i][j]: LCS length of a[start+i..endA) and b[start+j..endB), flattened.
      const w = m + 1;
      const lcs = new Uint16Array((n + 1) * w);
      for (let i = n - 1; i >= 0; i--) {
        for (let j = m - 1; j >= 0; j--) {
          lcs[i * w + j] =
            a[start + i] === b[start + j]
              ? lcs[(i + 1) * w + j + 1] + 1
              : Math.max(lcs[(i + 1) * w + j], lcs[i * w + j + 1]);
        }
      }
      let i = 0;
      let j = 0;
      while (i < n && j < m) {
        if (a[start + i] === b[start + j]) {
          keepA[start + i] = keepB[start + j] = true;
          i++;
          j++;
        } else if (lcs[(i + 1) * w + j] >= lcs[i * w + j + 1]) {
          i++;
        } else {
          j++;
        }
      }
    }
    return [keepA, keepB];
  }

  /** Text with the changed runs wrapped in tag (del or ins); whitespace joins runs, never starts one. */
  function marked(toks, keep, tag) {
    const out = [];
    let run = null;
    let count = 0;
    toks.forEach((tok, i) => {
      const blank = /^\s+$/.test(tok);
      let changed = !keep[i] && !blank;
      if (blank && run) {
        // A space inside a changed run stays in it when the next word is changed too.
        let k = i + 1;
        changed = k < toks.length && !keep[k];
      }
      if (changed) {
        if (!run) {
          run = el(tag);
          out.push(run);
          count++;
        }
        run.append(tok);
      } else {
        run = null;
        const last = out[out.length - 1];
        if (typeof last === "string") out[out.length - 1] = last + tok;
        else out.push(tok);
      }
    });
    return { nodes: out, count };
  }

  function outputText(output) {
    if (output === null || output === undefined) return "";
    return typeof output === "string" ? output : JSON.stringify(output, null, 2);
  }

  function side(arm, info, nodes) {
    const status = [info.status ?? "no response", info.outcome].filter(Boolean).join(" · ");
    return el(
      "div",
      "side " + arm + (info.outcome ? " failed" : ""),
      el("div", "side-head", el("span", null, arm), el("span", "muted", status)),
      el("pre", null, nodes.length ? nodes : el("span", "muted", "(no output)")),
    );
  }

  function renderExamples(report) {
    const examples = Array.isArray(report.examples) ? report.examples : [];
    state.examples = examples.length;
    let highlighted = 0;
    const body = $("examples-body");
    body.classList.remove("muted");
    state.examplesWithheld = report.examples_withheld === true;
    if (state.examplesWithheld) {
      state.highlighted = 0;
      const hint =
        "Examples withheld: they show recorded prompts and answers. Open this page as /#token=<admin.token>.";
      fill(body, el("p", "muted", hint));
      return;
    }
    if (!examples.length) {
      state.highlighted = 0;
      fill(body, el("p", "muted", "No differing pairs in this range."));
      return;
    }
    fill(
      body,
      examples.map((ex) => {
        const inc = ex.incumbent || {};
        const cand = ex.candidate || {};
        const a = tokens(outputText(inc.output));
        const b = tokens(outputText(cand.output));
        // A failed arm's body is an error, not an answer: shown as it is, without word marks.
        const failed = Boolean(inc.outcome || cand.outcome);
        const [keepA, keepB] = failed ? [a.map(() => true), b.map(() => true)] : diff(a, b);
        const left = marked(a, keepA, "del");
        const right = marked(b, keepB, "ins");
        highlighted += left.count + right.count;
        const m = ex.metrics || {};
        const facts = [
          isNum(m.similarity) ? `similarity ${m.similarity.toFixed(3)}` : null,
          isNum(m.token_similarity) ? `tokens ${m.token_similarity.toFixed(3)}` : null,
          isNum(m.latency_delta_ms) ? `latency ${m.latency_delta_ms > 0 ? "+" : ""}${fmtMs(m.latency_delta_ms)}` : null,
          Array.isArray(m.field_diffs) && m.field_diffs.length ? `fields ${m.field_diffs.join(", ")}` : null,
        ].filter(Boolean);
        return el(
          "div",
          { class: "example", "data-request-id": ex.request_id },
          el(
            "div",
            "example-head",
            el("code", null, ex.request_id || "?"),
            el("span", "muted", `${ex.route || ""} · ${ex.model || "no model"} · ${clock(ex.time)}`),
            el("span", "small", facts.join(" · ")),
          ),
          el("div", "sides", side("incumbent", inc, left.nodes), side("candidate", cand, right.nodes)),
        );
      }),
    );
    state.highlighted = highlighted;
  }

  // ---- the whole report ------------------------------------------------------------------------

  function renderReport(report) {
    const series = Array.isArray(report.timeseries) ? report.timeseries : [];
    const gates = pick(report, "verdict.gates") || [];
    const divergenceGate = gates.find((g) => g.name === "divergence");
    const outcome = pick(report, "verdict.outcome") || "unknown";
    const verdict = $("verdict");
    verdict.className = "pill " + outcome.replace(/[^a-z_]/g, "");
    verdict.textContent = "verdict: " + outcome;
    const range = report.range || {};
    $("gates-range").textContent = `${fmtInt(range.windows)} windows since ${clock(range.since)} · overall ${outcome}`;
    renderKpis(report);
    renderGates(report);
    state.plotted = {
      latency: latencyChart(series),
      distribution: distributionChart(report),
      errors: errorsChart(series, report.summary),
      divergence: divergenceChart(series, report.summary, divergenceGate),
      cost: costChart(series, report.summary),
    };
    renderExamples(report);
    renderFooter(report);
  }

  function renderNoReport(message) {
    const verdict = $("verdict");
    verdict.className = "pill";
    verdict.textContent = "no report";
    fill($("kpis"));
    fill($("gates-body"), el("tr", null, el("td", { colspan: "7", class: "muted" }, "No report: " + message + ".")));
    fill($("examples-body"), el("p", "muted", "No report: " + message + "."));
    for (const box of document.querySelectorAll(".chart")) {
      if (!box.querySelector(".empty")) box.append(el("div", "empty", "no report"));
    }
  }

  function renderFooter(report) {
    const drift = (Array.isArray(report.drift) ? report.drift : [])
      .filter((d) => d.drift)
      .map(
        (d) =>
          `drift in ${d.metric}: ` + (isNum(d.change_pct) ? `${d.change_pct.toFixed(1)}%` : `Fisher p ${d.fisher_p}`),
      );
    const notes = [...drift, ...(Array.isArray(report.notes) ? report.notes : [])];
    fill(
      $("notes"),
      notes.map((n) => el("li", null, n)),
    );
    const workers = Array.isArray(report.workers) ? report.workers : [];
    $("workers").textContent = workers.length
      ? "comparator workers: " +
        workers.map((w) => `${w.consumer} (applied ${fmtInt(w.applied)}, seen ${ago(w.time)})`).join(", ") +
        ` · ${fmtInt(report.pending)} pending`
      : "no live comparator worker";
  }

  // ---- polling ---------------------------------------------------------------------------------

  let timer = null;
  let latest = 0; // the newest refresh started: an older one still in flight must not draw over it

  async function fetchJson(path) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = "Bearer " + token;
    const response = await fetch(path, { headers, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    return { status: response.status, body };
  }

  function problem(message) {
    const banner = $("problem");
    banner.hidden = !message;
    banner.textContent = message || "";
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++latest;
    const wanted = new URLSearchParams();
    if ($("since").value) wanted.set("since", $("since").value);
    if ($("candidate").value) wanted.set("candidate", $("candidate").value);
    const query = wanted.toString() ? "?" + wanted.toString() : "";
    try {
      const [report, canary] = await Promise.all([fetchJson("api/report" + query), fetchJson("api/canary")]);
      if (mine !== latest) return;
      renderCanary(canary);
      if (report.status === 200 && report.body) {
        renderCandidates(report.body);
        renderReport(report.body);
        problem(null);
      } else {
        const message = String(pick(report.body, "error.message") || `HTTP ${report.status}`).replace(
          /:\s*no report$/i,
          "",
        );
        renderNoReport(message);
        problem("No report: " + message + ".");
      }
      state.error = null;
    } catch (err) {
      if (mine !== latest) return;
      state.error = String(err && err.stack ? err.stack : err);
      problem("Refresh failed: " + (err && err.message ? err.message : err) + " (retrying)");
    }
    state.refreshes += 1;
    document.body.dataset.refreshes = String(state.refreshes);
    $("status").textContent =
      `updated ${clock(Date.now() / 1000)} · ${state.paused ? "paused" : "every " + REFRESH_MS / 1000 + " s"}`;
    schedule();
  }

  // One option per candidate in the range, each with its verdict; the shown one is the report's.
  function renderCandidates(report) {
    const select = $("candidate");
    const chosen = select.value;
    const items = report.candidates || [];
    select.replaceChildren(el("option", { value: "" }, "default (" + (report.candidate || "-") + ")"));
    for (const item of items) {
      select.append(el("option", { value: item.name }, `${item.name}: ${item.verdict}, ${fmtInt(item.pairs)} pairs`));
    }
    if (chosen && !items.some((item) => item.name === chosen)) select.append(el("option", { value: chosen }, chosen));
    select.value = chosen;
  }

  function schedule() {
    clearTimeout(timer);
    if (!state.paused) timer = setTimeout(refresh, REFRESH_MS);
  }

  function start() {
    const since = params.get("since");
    if (since) {
      const select = $("since");
      if (![...select.options].some((o) => o.value === since)) select.append(el("option", { value: since }, since));
      select.value = since;
    }
    const candidate = params.get("candidate");
    if (candidate) {
      $("candidate").append(el("option", { value: candidate }, candidate));
      $("candidate").value = candidate;
    }
    $("since").addEventListener("change", refresh);
    $("candidate").addEventListener("change", refresh);
    $("pause").addEventListener("click", () => {
      state.paused = !state.paused;
      $("pause").textContent = state.paused ? "resume" : "pause";
      if (state.paused) clearTimeout(timer);
      else refresh();
    });
    refresh();
  }

  start();
})();
