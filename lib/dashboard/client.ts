/**
 * The dashboard's own browser code and styles, served from /assets/ beside htmx and uPlot
 * (no inline script: the pages' Content-Security-Policy allows scripts from the server only).
 *
 * The script draws each `[data-chart]` element's chart with uPlot, on load and on every
 * htmx swap (the overview's table and charts are swapped in every 2 s): one for all queues,
 * and a small one per queue (`data-chart-kind="queue"`: completed/s and failure rate).
 *
 * @module
 */

export const DASHBOARD_JS = `"use strict";
(function () {
  function draw(root) {
    var charts = root.querySelectorAll ? root.querySelectorAll("[data-chart]") : [];
    for (var i = 0; i < charts.length; i++) {
      var el = charts[i];
      if (el.dataset.drawn) continue;
      el.dataset.drawn = "1";
      var data = JSON.parse(el.dataset.chart);
      var opts = el.dataset.chartKind === "queue" ? queueChart(el) : allChart(el);
      new uPlot(opts, data, el);
    }
  }
  // All queues: completed, retried and dead-lettered per second.
  function allChart(el) {
    return {
      width: Math.max(320, Math.min(760, el.clientWidth || 640)),
      height: 160,
      scales: { x: { time: true } },
      series: [
        {},
        { label: "completed/s", stroke: "#1f8a4c", width: 2 },
        { label: "retried/s", stroke: "#b35c00", width: 2 },
        { label: "dead-lettered/s", stroke: "#c0392b", width: 2 },
      ],
    };
  }
  // One queue, small: completed per second (left scale) and failure rate in % (right).
  function queueChart(el) {
    return {
      width: 220,
      height: 70,
      legend: { show: false },
      cursor: { show: false },
      scales: { x: { time: true }, n: {}, pct: { range: [0, 100] } },
      axes: [
        { show: false },
        { scale: "n", size: 36, font: "10px system-ui", ticks: { show: false } },
        { scale: "pct", side: 1, size: 30, font: "10px system-ui", ticks: { show: false },
          grid: { show: false }, values: function (u, vals) {
            return vals.map(function (v) { return v + "%"; });
          } },
      ],
      series: [
        {},
        { label: "completed/s", scale: "n", stroke: "#1f8a4c", width: 1.5 },
        { label: "failed %", scale: "pct", stroke: "#c0392b", width: 1.5, spanGaps: false },
      ],
    };
  }
  htmx.onLoad(draw);
})();
`;

export const DASHBOARD_CSS = `
:root { font-family: system-ui, sans-serif; color: #1b1f23; background: #fafbfc; }
body { margin: 0; }
header { background: #0d3b66; color: #fff; padding: 0.5rem 1rem; display: flex; gap: 1rem;
  align-items: center; flex-wrap: wrap; }
header a { color: #fff; text-decoration: none; }
header a.current { text-decoration: underline; }
header .brand { font-weight: 700; margin-right: 1rem; }
header .mode { margin-left: auto; font-size: 0.85rem; opacity: 0.85; }
main { padding: 1rem; }
h1 { font-size: 1.3rem; margin: 0.3rem 0 1rem; }
h2 { font-size: 1.05rem; margin: 1.5rem 0 0.5rem; }
table { border-collapse: collapse; background: #fff; font-size: 0.9rem; }
th, td { border: 1px solid #dde1e6; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #eef1f4; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.paused { color: #b35c00; font-weight: 600; }
.state-dead, .status-failed { color: #c0392b; }
.status-completed { color: #1f8a4c; }
.status-cancelled { color: #6a737d; }
form.inline { display: inline; margin: 0; }
form.filters { display: flex; gap: 0.5rem; flex-wrap: wrap; align-items: end; margin-bottom: 1rem; }
form.filters label { display: flex; flex-direction: column; font-size: 0.8rem; }
button { cursor: pointer; }
button.danger { color: #fff; background: #c0392b; border: 1px solid #922b21; }
pre { background: #fff; border: 1px solid #dde1e6; padding: 0.6rem; overflow: auto; max-height: 30rem; }
.notice { background: #e8f5e9; border: 1px solid #a5d6a7; padding: 0.5rem; margin-bottom: 1rem; }
.muted { color: #6a737d; font-size: 0.85rem; }
.chart { min-height: 180px; }
.spark { min-height: 70px; }
.queue-rates span { font-size: 0.85rem; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { font-weight: 600; }
progress { width: 10rem; }
`;
