// The dashboard's script: one EventSource, the notes per channel, the reset notice, and two
// charts of the `metrics` events drawn on <canvas>. Plain JavaScript, no build step.
"use strict";

(() => {
  /** Samples a chart keeps: a minute at the default interval. */
  const HISTORY = 60;

  const root = document.getElementById("dashboard");
  const channels = JSON.parse(root.dataset.channels);
  const publicChannels = JSON.parse(root.dataset.public);
  const url = root.dataset.stream + "?" +
    channels.map((c) => "channel=" + encodeURIComponent(c)).join("&");
  const source = new EventSource(url);
  const status = document.getElementById("status");

  function setStatus(text) {
    status.textContent = text;
    status.classList.toggle("open", text.startsWith("open"));
  }

  source.onopen = () => { setStatus("open"); };
  source.onerror = () => {
    // A refused reconnection (403 after logging out elsewhere) closes the source for good.
    const closed = source.readyState === EventSource.CLOSED;
    setStatus(closed ? "closed (reload the page)" : "reconnecting…");
  };

  function show(channel, text) {
    const list = document.getElementById("log-" + channel);
    if (!list) return;
    const item = document.createElement("li");
    item.textContent = text;
    list.prepend(item);
  }

  source.addEventListener("note", (e) => {
    const data = JSON.parse(e.data);
    show(data.channel || "news", e.lastEventId + " " + JSON.stringify(data.data || data.text));
  });

  let reset = false;
  // The server sends a reset (if any) before the hello of the same connection.
  source.addEventListener("sse-reset", () => { reset = true; });
  source.addEventListener("hello", () => {
    setStatus(reset ? "open (history reset: reload for the full state)" : "open");
    reset = false;
  });

  /** The smallest of 1, 2, 5, 10, 20, 50, ... that is at least `value`. */
  function niceCeiling(value) {
    let step = 1;
    for (let i = 0; i < 30; i += 1) {
      for (const factor of [1, 2, 5]) {
        if (step * factor >= value) return step * factor;
      }
      step *= 10;
    }
    return value;
  }

  /** A line chart of the last HISTORY values, newest on the right. */
  class Chart {
    constructor(canvas) {
      this.canvas = canvas;
      this.color = canvas.dataset.color;
      this.values = [];
      this.received = 0;
    }

    push(value) {
      this.values.push(value);
      if (this.values.length > HISTORY) this.values.shift();
      this.received += 1;
      this.canvas.dataset.points = String(this.received);
      this.draw();
    }

    draw() {
      const canvas = this.canvas;
      const ratio = window.devicePixelRatio || 1;
      const width = canvas.clientWidth;
      const height = canvas.clientHeight;
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
      const ctx = canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, width, height);

      const left = 34;
      const top = 8;
      const bottom = height - 18;
      const right = width - 4;
      const topValue = niceCeiling(Math.max(1, ...this.values));
      const y = (v) => bottom - (v / topValue) * (bottom - top);
      const step = (right - left) / (HISTORY - 1);
      const x = (i) => right - (this.values.length - 1 - i) * step;

      ctx.font = "11px system-ui, sans-serif";
      ctx.fillStyle = "#5f6b76";
      ctx.strokeStyle = "#e5e8ec";
      ctx.lineWidth = 1;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      // Half-way only where it is a whole number: the charts count streams and events.
      const levels = Number.isInteger(topValue / 2) ? [0, topValue / 2, topValue] : [0, topValue];
      for (const v of levels) {
        ctx.beginPath();
        ctx.moveTo(left, Math.round(y(v)) + 0.5);
        ctx.lineTo(right, Math.round(y(v)) + 0.5);
        ctx.stroke();
        ctx.fillText(String(v), left - 6, y(v));
      }
      ctx.textAlign = "left";
      ctx.textBaseline = "alphabetic";
      ctx.fillText("last " + HISTORY + " samples", left, height - 3);
      if (this.values.length === 0) return;

      ctx.beginPath();
      this.values.forEach((v, i) => {
        if (i === 0) ctx.moveTo(x(i), y(v));
        else ctx.lineTo(x(i), y(v));
      });
      ctx.strokeStyle = this.color;
      ctx.lineWidth = 2;
      ctx.lineJoin = "round";
      ctx.stroke();
      ctx.lineTo(x(this.values.length - 1), bottom);
      ctx.lineTo(x(0), bottom);
      ctx.closePath();
      ctx.globalAlpha = 0.12;
      ctx.fillStyle = this.color;
      ctx.fill();
      ctx.globalAlpha = 1;
      const last = this.values.length - 1;
      ctx.beginPath();
      ctx.arc(x(last), y(this.values[last]), 3, 0, 2 * Math.PI);
      ctx.fill();
    }
  }

  const charts = {
    streams: new Chart(document.getElementById("chart-streams")),
    rate: new Chart(document.getElementById("chart-rate")),
  };
  for (const chart of Object.values(charts)) chart.draw();
  window.addEventListener("resize", () => {
    for (const chart of Object.values(charts)) chart.draw();
  });

  function showCounts(counts) {
    const most = Math.max(1, ...publicChannels.map((c) => counts[c] || 0));
    for (const channel of publicChannels) {
      const n = counts[channel] || 0;
      document.getElementById("count-" + channel).textContent = String(n);
      document.getElementById("bar-" + channel).style.width = (100 * n / most) + "%";
    }
  }

  // For the console and the tests.
  window.dashboard = { source, charts };

  source.addEventListener("metrics", (e) => {
    const sample = JSON.parse(e.data);
    charts.streams.push(sample.streams);
    charts.rate.push(sample.rate);
    document.getElementById("streams").textContent = String(sample.streams);
    document.getElementById("rate").textContent = sample.rate.toFixed(1);
    showCounts(sample.channels || {});
  });
})();
