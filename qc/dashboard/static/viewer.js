// The series page's slice viewer (cohortflow's own code, served by the dashboard: no CDN, no
// library). The server draws every slice (/series/UID/slice.png); this script only asks for
// the one the reviewer wants: the plane, the slice (mouse wheel, arrow keys, Page Up and Page
// Down, Home and End, the slider), the grey window (level and width), the tissue overlay and
// its opacity. One picture is asked for at a time; moves made meanwhile are folded into the
// next request, so fast scrolling never queues a backlog on the server.
"use strict";

(function () {
  const viewer = document.querySelector("[data-testid=viewer]");
  if (!viewer) {
    return;
  }
  const series = encodeURIComponent(viewer.dataset.series);
  const img = viewer.querySelector("img.slice");
  const control = (name) => viewer.querySelector(`[data-control=${name}]`);
  const shown = (name) => viewer.querySelector(`[data-testid=${name}]`);
  const note = shown("viewer-note");
  const state = { plane: "axial", index: {}, center: 0, width: 1, overlay: true, opacity: 0.7 };
  let meta = null;
  let loading = false;
  let wanted = null;

  function url() {
    const q = new URLSearchParams({
      plane: state.plane,
      index: String(state.index[state.plane]),
      center: state.center.toPrecision(6),
      width: state.width.toPrecision(6),
      overlay: state.overlay && meta.overlay ? "1" : "0",
      opacity: state.opacity.toFixed(2),
    });
    return `/series/${series}/slice.png?${q}`;
  }

  function request() {
    wanted = url();
    if (!loading) {
      load();
    }
  }

  function load() {
    if (wanted === null || wanted === img.getAttribute("src")) {
      wanted = null;
      return;
    }
    loading = true;
    viewer.dataset.loading = "1";
    img.src = wanted;
    wanted = null;
  }

  function settled() {
    loading = false;
    if (wanted !== null) {
      load();
      return;
    }
    delete viewer.dataset.loading;
    // what the picture shows now (read by the browser test)
    viewer.dataset.shown = img.getAttribute("src");
  }

  img.addEventListener("load", settled);
  img.addEventListener("error", () => {
    settled();
    note.textContent = "This slice could not be drawn: reload the page.";
  });

  function show() {
    const plane = meta.planes[state.plane];
    const slider = control("index");
    slider.max = String(plane.slices - 1);
    slider.value = String(state.index[state.plane]);
    shown("slice-index").textContent =
      `${state.index[state.plane] + 1} / ${plane.slices} (${plane.order})`;
    viewer.dataset.plane = state.plane;
    viewer.dataset.index = String(state.index[state.plane]);
    const [left, right, top, bottom] = plane.letters;
    for (const [where, letter] of Object.entries({ left, right, top, bottom })) {
      viewer.querySelector(`[data-letter=${where}]`).textContent = letter;
    }
    for (const button of viewer.querySelectorAll("[data-plane]")) {
      const on = button.dataset.plane === state.plane;
      button.classList.toggle("on", on);
      button.setAttribute("aria-pressed", on ? "true" : "false");
    }
    control("center").value = String(state.center);
    control("width").value = String(state.width);
    shown("level").textContent = state.center.toPrecision(4);
    shown("width").textContent = state.width.toPrecision(4);
    control("overlay").checked = state.overlay && meta.overlay;
    shown("opacity").textContent = `${Math.round(state.opacity * 100)} %`;
    request();
  }

  function move(by) {
    const last = meta.planes[state.plane].slices - 1;
    const next = Math.min(last, Math.max(0, state.index[state.plane] + by));
    if (next !== state.index[state.plane]) {
      state.index[state.plane] = next;
      show();
    }
  }

  function resetWindow() {
    state.center = meta.window.center;
    state.width = meta.window.width;
  }

  function ready(found) {
    meta = found;
    for (const [name, plane] of Object.entries(meta.planes)) {
      state.index[name] = Math.floor(plane.slices / 2);
    }
    resetWindow();
    const span = Math.max(meta.range.max - meta.range.min, 1e-6);
    const level = control("center");
    level.min = String(meta.range.min);
    level.max = String(meta.range.max);
    level.step = String(span / 1000);
    const width = control("width");
    width.min = String(span / 1000);
    width.max = String(2 * span);
    width.step = String(span / 1000);
    for (const input of viewer.querySelectorAll("[data-control]")) {
      input.disabled = false;
    }
    if (!meta.overlay) {
      state.overlay = false;
      control("overlay").disabled = true;
      control("opacity").disabled = true;
      note.textContent +=
        " No overlay: " +
        (meta.overlay_problem ||
          "volumetry has not measured this series (its tissue labels are drawn over a " +
            "measured T1; the region defacing removed is not kept as an image).");
    }
    const legend = shown("viewer-legend");
    for (const item of meta.legend) {
      const entry = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = item.color; // CSSOM: allowed by the page's policy
      entry.append(swatch, item.label);
      legend.append(entry);
    }
    viewer.dataset.ready = "1";
    show();
  }

  for (const button of viewer.querySelectorAll("[data-plane]")) {
    button.addEventListener("click", () => {
      state.plane = button.dataset.plane;
      show();
    });
  }
  control("index").addEventListener("input", (event) => {
    state.index[state.plane] = Number(event.target.value);
    show();
  });
  control("center").addEventListener("input", (event) => {
    state.center = Number(event.target.value);
    show();
  });
  control("width").addEventListener("input", (event) => {
    state.width = Math.max(Number(event.target.value), Number(event.target.min));
    show();
  });
  control("overlay").addEventListener("change", (event) => {
    state.overlay = event.target.checked;
    show();
  });
  control("opacity").addEventListener("input", (event) => {
    state.opacity = Number(event.target.value) / 100;
    show();
  });
  control("reset").addEventListener("click", () => {
    resetWindow();
    show();
  });
  img.addEventListener(
    "wheel",
    (event) => {
      if (meta === null) {
        return;
      }
      event.preventDefault(); // the page does not scroll while the slices do
      move(event.deltaY > 0 ? 1 : -1);
    },
    { passive: false },
  );
  viewer.addEventListener("keydown", (event) => {
    if (meta === null || event.target.matches("input[type=range]")) {
      return; // a focused slider moves with the keys itself
    }
    const steps = { ArrowUp: 1, ArrowRight: 1, ArrowDown: -1, ArrowLeft: -1, PageUp: 10,
      PageDown: -10 };
    const last = meta.planes[state.plane].slices - 1;
    if (event.key in steps) {
      move(steps[event.key]);
    } else if (event.key === "Home") {
      move(-last);
    } else if (event.key === "End") {
      move(last);
    } else {
      return;
    }
    event.preventDefault();
  });

  fetch(`/api/series/${series}/volume`, { credentials: "same-origin" })
    .then((answer) => {
      if (!answer.ok) {
        throw new Error(String(answer.status));
      }
      return answer.json();
    })
    .then(ready)
    .catch(() => {
      note.textContent = "The image of this series cannot be shown.";
    });
})();
