// Diagnostics for the viewer page (?capture=1): hands what the page plays from the robot to
// the main thread in blocks of 4096 samples (first channel), for kvsViewer.takeCapture().
class KvsCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(4096);
    this.fill = 0;
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        this.block[this.fill++] = channel[i];
        if (this.fill === this.block.length) {
          this.port.postMessage(this.block);
          this.block = new Float32Array(4096);
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

registerProcessor("kvs-capture", KvsCapture);
