// Keyboard shortcuts of the rating page: 1 / left arrow, 2 / right arrow, t / down arrow.
(function () {
  var keys = {"1": "left", "ArrowLeft": "left", "2": "right", "ArrowRight": "right", "t": "tie", "ArrowDown": "tie"};
  var sent = false;
  document.addEventListener("keydown", function (event) {
    var id = keys[event.key];
    if (!id || sent || event.ctrlKey || event.metaKey || event.altKey) return;
    event.preventDefault();
    sent = true;  // one answer per page, however long the key is held
    document.getElementById(id).click();
  });
})();
