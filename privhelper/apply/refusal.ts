/** Why a layer is refused; `rule` names the rule (the validator's names), `entry` the tar entry. */
export class LayerRefused extends Error {
  readonly rule: string;
  readonly entry: string;
  constructor(rule: string, entry: string, message: string) {
    super(message);
    this.name = "LayerRefused";
    this.rule = rule;
    this.entry = entry;
  }
}
