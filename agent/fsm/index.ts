// Entry point of the FSM engine: `import { FsmEngine, abort } from "./fsm/index.ts"`.
export * from "./engine.ts";
